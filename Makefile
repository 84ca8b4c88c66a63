# Two commands do all set-up on a fresh machine:
#   make quickstart   # venv + install + train the tiny SDXL LoRA quickstart
#   make test         # venv + install + the test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt setup.py | cksum | cut -d' ' -f1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install quickstart test check benchmark clean

install: $(STAMP)

$(STAMP): requirements.txt setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

quickstart: install
	$(PY) train.py --config configs/quickstart.yaml

test: install
	$(PY) -m pytest -q tests

check: install
	$(PY) test_installation.py

benchmark: install
	$(PY) benchmarks/bench_sft.py

clean:
	rm -rf output cache .pytest_cache
