#!/usr/bin/env bash
# The GPU benchmark behind docs/PERFORMANCE.md, as one command (one lent-GPU call):
#
#   benchmarks/gpu_run.sh           # GPU: SD1.5 shapes at 512 px; results in $OUT
#   benchmarks/gpu_run.sh --tiny    # dry run of this very script on a CPU (tiny model, 64 px,
#                                   # compile modes replaced by none, a 4-image job)
#
# On the lent GPU machine the packages its image lacks (diffusers, hydra-core, omegaconf,
# antlr4-python3-runtime) travel as wheels in .whl/ and the shared reference recipe as
# .bench_ref/sd15_lora_reference.py (both git-ignored; docs/PERFORMANCE.md says how to make them).
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
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
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
EOF
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# Priority order: a case that would not fit the remaining --budget-s is skipped and reported.
# The job rows run right after the reduce-overhead case with the same settings, so they show
# whether a new job (a new LoRA) reuses the compiled UNet (graphs compiled = 0).
CASES=(
  ref:4:gc ref:4:nogc ref:16:nogc
  ours:4:gc ours:4 ours:16
  ours:4:reduce-overhead
  job:4:reduce-overhead:images=20:epochs=100:nockpt
  job:4:reduce-overhead:images=20:epochs=100
  ref:1:gc
  ours:16:default
)
# BENCH_CASES="ref:4:gc ours:4" replaces the list (e.g. for a quick dry run).
if [[ -n "${BENCH_CASES:-}" ]]; then read -ra CASES <<<"$BENCH_CASES"; fi
ARGS=(--steps 15 --warmup 5 --audit-steps 5 --budget-s "${BUDGET_S:-420}")
if [[ $MODE == tiny ]]; then
  CASES=("${CASES[@]//reduce-overhead/none}")
  CASES=("${CASES[@]//:default/:none}")
  CASES=("${CASES[@]//images=20:epochs=100/images=4:epochs=2}")
  CASES=("${CASES[@]//:16/:2}")
  CASES=("${CASES[@]//:4/:2}")
  ARGS=(--tiny --cpu --steps 2 --warmup 1 --peak-tflops 1 --budget-s "${BUDGET_S:-1200}")
fi
CASE_ARGS=()
for c in "${CASES[@]}"; do CASE_ARGS+=(--case "$c"); done

"$PY" -m lightning_lora.bench "${CASE_ARGS[@]}" "${ARGS[@]}" --e2e \
  --workdir /tmp/ll-bench-work --json "$OUT/bench.json" --table "$OUT/bench.md" \
  2>&1 | grep --line-buffered -v -E "━|Loading weights|LeafSpec|kept in float32" | tee "$OUT/bench.log"
status=${PIPESTATUS[0]}
echo
echo "== $OUT/bench.md (exit $status)"
cat "$OUT/bench.md" 2>/dev/null
exit "$status"
