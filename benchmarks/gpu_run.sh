#!/usr/bin/env bash
# The GPU benchmark behind docs/PERFORMANCE.md, as one command (one lent-GPU call):
#
#   benchmarks/gpu_run.sh           # GPU: SD1.5 shapes at 512 px; results in $OUT
#   benchmarks/gpu_run.sh --tiny    # dry run of this very script on a CPU (tiny model, 64 px,
#                                   # compile modes replaced by none, a 4-image job)
#
# The baseline (diffusers' recipe step) is benchmarks/baseline.py; the shared reference recipe
# runs as a cross-check column where it is found ($LIGHTNING_LORA_REFERENCE, ../shared/bench, or
# a carried .bench_ref/sd15_lora_reference.py). On the lent GPU machine the packages its image
# lacks travel as wheels in .whl/ (git-ignored; docs/PERFORMANCE.md says how to make them); only
# the wheels of distributions that are not installed are installed.
# Writes $OUT/bench.json (everything), $OUT/bench.md (the tables), $OUT/bench.log, $OUT/env.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
MODE=gpu
[[ "${1:-}" == "--tiny" ]] && MODE=tiny
OUT="${OUT:-$PWD/outputs/bench-$MODE}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_HUB_DISABLE_PROGRESS_BARS=1 TOKENIZERS_PARALLELISM=false
export LIGHTNING_LORA_CACHE="${LIGHTNING_LORA_CACHE:-/tmp/ll-bench-cache}"

PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
  if [[ $MODE == tiny && -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ $MODE == gpu ]] && compgen -G ".whl/*.whl" >/dev/null; then
  # the carried wheels whose distribution the image lacks (the image's own versions win)
  mapfile -t WHEELS < <("$PY" - <<'EOF'
import glob
from importlib.metadata import PackageNotFoundError, version

for wheel in sorted(glob.glob(".whl/*.whl")):
    name = wheel.rsplit("/", 1)[-1].split("-")[0]
    try:
        version(name)
    except PackageNotFoundError:
        print(wheel)
EOF
)
  if (( ${#WHEELS[@]} )); then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "${WHEELS[@]}" || { echo "wheel install failed"; exit 1; }
  fi
  echo "installed from .whl: ${WHEELS[*]:-none}"
  export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
if [[ -z "${LIGHTNING_LORA_REFERENCE:-}" && -f .bench_ref/sd15_lora_reference.py ]]; then
  export LIGHTNING_LORA_REFERENCE="$PWD/.bench_ref/sd15_lora_reference.py"
fi

{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm \
    --format=csv 2>/dev/null || echo "no nvidia-smi"
  "$PY" - <<'EOF'
import platform
from importlib.metadata import version

import torch

names = ["torch", "diffusers", "peft", "transformers", "lightning", "hydra-core", "omegaconf"]
print("python", platform.python_version())
print(" ".join(f"{n}={version(n)}" for n in names))
print("cuda", torch.version.cuda, "available", torch.cuda.is_available(), "cpus", torch.get_num_threads())
try:
    import lightning_lora.worker.app  # noqa: F401  (the e2e row needs the worker)

    print("worker importable: yes")
except Exception as exc:
    print("worker importable: no", repr(exc))
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Priority order (a case that would not fit the remaining --budget-s is skipped and reported),
# one target after the other: the memory target (ours:4:gc, with the baseline beside it), b16
# eager, the cold-compile target and b16 throughput (ours:16:regional), the b4 target
# (ours:4:reduce-overhead), the warm-worker target (the job right after the reduce-overhead case
# with the same settings: a new LoRA reuses the compiled UNet, graphs compiled = 0), the
# cross-check against the shared reference, then whole-model compile at b16 (regional must stay
# within 5% of it) and regional with the ResNet blocks too.
# base = benchmarks/baseline.py (diffusers' recipe step); ref = the shared reference file (the row
# says skipped where it is not found).
CASES=(
  base:4:gc ours:4:gc
  base:16:nogc ours:16
  ours:16:regional
  ours:4:reduce-overhead
  job:4:reduce-overhead:images=20:epochs=100:nockpt
  ref:4:gc
  ours:16:default
  ours:16:regional:blocks=ResnetBlock2D
  base:4:nogc ours:4 ref:16:nogc
  job:4:reduce-overhead:images=20:epochs=100
)
# BENCH_CASES="ref:4:gc ours:4" replaces the list (e.g. for a quick dry run).
if [[ -n "${BENCH_CASES:-}" ]]; then read -ra CASES <<<"$BENCH_CASES"; fi
ARGS=(--steps 15 --warmup 5 --audit-steps 5 --budget-s "${BUDGET_S:-460}")
if [[ $MODE == tiny ]]; then
  CASES=("${CASES[@]//reduce-overhead/none}")
  CASES=("${CASES[@]//:default/:none}")
  CASES=("${CASES[@]//:regional/:none}")
  CASES=("${CASES[@]//:blocks=ResnetBlock2D/}")
  CASES=("${CASES[@]//images=20:epochs=100/images=4:epochs=2}")
  CASES=("${CASES[@]//:16/:2}")
  CASES=("${CASES[@]//:4/:2}")
  ARGS=(--tiny --cpu --steps 2 --warmup 1 --peak-tflops 1 --budget-s "${BUDGET_S:-1200}"
    --e2e-epochs "${E2E_EPOCHS:-2}")
fi
CASE_ARGS=()
for c in "${CASES[@]}"; do CASE_ARGS+=(--case "$c"); done

"$PY" -m benchmarks "${CASE_ARGS[@]}" "${ARGS[@]}" --e2e \
  --workdir /tmp/ll-bench-work --json "$OUT/bench.json" --table "$OUT/bench.md" \
  2>&1 | grep --line-buffered -v -E "━|Loading weights|LeafSpec|kept in float32" | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
echo
echo "== $OUT/bench.md (exit $status)"
cat "$OUT/bench.md" 2>/dev/null
exit "$status"
