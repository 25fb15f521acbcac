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

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
