# Two commands set up a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# CPU machines take a plain torch pin that installs fast here; GPU machines take the newest build.
TORCH_SPEC ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)

.PHONY: install demo pretrain-tiny test test-fast lint typecheck format train load soak bench clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e ".[test]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(VENV)/bin/lightning-lora-train experiment=demo

# rebuild the demo's pretrained tiny model (lightning_lora/demo/pretrained/tiny-sd15-shapes) from
# nothing: procedural shapes, CPU only, about 30 minutes on 2 cores
pretrain-tiny: install
	$(PY) -m lightning_lora.demo.pretrain --out lightning_lora/demo/pretrained/tiny-sd15-shapes

test: install
	$(PY) -m pytest

# the edit-test loop: unit-level tests only (no training runs, no worker processes)
test-fast: install
	$(PY) -m pytest -m "not slow and not load" -q

lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# mypy over the package (settings in pyproject.toml's [tool.mypy]); zero errors expected
typecheck: install
	$(VENV)/bin/mypy

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# make train ARGS="model=sd15 data.image_dir=/data/style trainer.max_epochs=50"
train: install
	$(VENV)/bin/lightning-lora-train $(ARGS)

# the reliability figures of docs/RELIABILITY.md (30 tiny jobs over 2 worker processes)
load: install
	$(PY) benchmarks/load_test.py --jobs 30 --workers 2

# the soak of docs/RELIABILITY.md: 60 jobs plus a few hundred failing and refused messages over
# 2 workers; each worker's threads, descriptors and RSS warm and at the end
soak: install
	$(PY) benchmarks/load_test.py --jobs 60 --workers 2 --soak

# the speed table of docs/PERFORMANCE.md (CPU: tiny model; CUDA: SD1.5 shapes), e.g.
# make bench ARGS="--case base:4:gc --case ours:4:gc --json bench.json"
bench: install
	$(PY) -m benchmarks $(ARGS)

clean:
	rm -rf outputs .pytest_cache
