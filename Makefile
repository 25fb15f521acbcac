# Set-up and the two commands the README promises: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint bench clean

# On a CPU-only machine pin the local CPU build of torch so pip never pulls a multi-GB CUDA
# build; a torch that is already importable in the venv is kept as it is.
$(BIN)/python:
	@echo "setup: creating $(VENV) with $(PY)"
	@$(PY) -m venv $(VENV)
	@$(BIN)/pip install -q --upgrade pip

setup: $(BIN)/python
	@if $(BIN)/python -c "import torch" 2>/dev/null; then \
		echo "setup: torch already installed: $$($(BIN)/python -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
		echo "setup: installing torch>=2.4 (a GPU is present: the default CUDA build, several GB)"; \
		$(BIN)/pip install -q "torch>=2.4"; \
	else \
		echo "setup: installing torch==2.13.0 (no GPU: the CPU build, never a multi-GB CUDA one)"; \
		$(BIN)/pip install -q torch==2.13.0; \
	fi
	@echo "setup: installing modelsplit (editable) with its dev extra: pytest, hypothesis, ruff, mypy, transformers"
	@$(BIN)/pip install -q -e ".[dev]"
	@echo "setup: done ($(VENV))"

demo: setup
	$(BIN)/python examples/quickstart.py

lint: setup
	$(BIN)/ruff check modelsplit partitioner runtime tests examples benchmarks
	$(BIN)/ruff format --check modelsplit partitioner runtime tests examples benchmarks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python benchmarks/planner.py
	$(BIN)/python benchmarks/plan_stability.py
	$(BIN)/python benchmarks/runtime.py
	$(BIN)/python benchmarks/training.py
	$(BIN)/python benchmarks/recovery.py
	$(BIN)/python benchmarks/distributed.py
	$(BIN)/python benchmarks/step_prediction.py
	$(BIN)/python benchmarks/backward_cost.py
	$(BIN)/python benchmarks/train_baselines.py

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis

# The model zoo (benchmarks/zoo.py, docs/zoo.md) in a venv of its own: PyPI's torchvision does
# not import beside the CPU torch 2.13.0 of .venv, so .venv-zoo takes torch 2.14.1 with
# torchvision 0.29.1 (a CUDA build that runs on the CPU; pip takes both from this machine's
# disk), then timm and transformers, then modelsplit itself without letting pip touch torch.
# `make zoo ZOO_ARGS=--quick` runs the CI-sized subset.
ZOO_VENV ?= .venv-zoo

.PHONY: zoo zoo-setup
$(ZOO_VENV)/.zoo-ready:
	@echo "zoo: creating $(ZOO_VENV) with $(PY)"
	@$(PY) -m venv $(ZOO_VENV)
	@$(ZOO_VENV)/bin/pip install -q --upgrade pip
	@echo "zoo: installing torch==2.14.1 torchvision==0.29.1 (torchvision's models; PyPI's torchvision does not import beside torch 2.13.0)"
	@$(ZOO_VENV)/bin/pip install -q torch==2.14.1 torchvision==0.29.1
	@echo "zoo: installing timm==1.0.31 transformers==5.25.0 (the timm and Hugging Face architectures, built from configs)"
	@$(ZOO_VENV)/bin/pip install -q timm==1.0.31 transformers==5.25.0
	@echo "zoo: installing modelsplit (editable, --no-deps, so pip keeps torch 2.14.1) and its other dependencies"
	@$(ZOO_VENV)/bin/pip install -q --no-deps -e .
	@$(ZOO_VENV)/bin/pip install -q $$($(ZOO_VENV)/bin/python -c "import tomllib; print(' '.join(d for d in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not d.startswith('torch')))")
	@$(ZOO_VENV)/bin/python -c "import torch, torchvision, timm, transformers; print('zoo: torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__, 'transformers', transformers.__version__)"
	@touch $@

zoo-setup: $(ZOO_VENV)/.zoo-ready

zoo: $(ZOO_VENV)/.zoo-ready
	nice -n 10 $(ZOO_VENV)/bin/python benchmarks/zoo.py $(ZOO_ARGS)

