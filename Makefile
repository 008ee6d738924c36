# imgsearch: every target installs what it needs; nothing is assumed on the machine.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
CACHE := $(HOME)/.cache/imgsearch
EXTRAS ?= cpu,dev
PORT ?= 8080
comma := ,
# "compat" in the name: a venv installed before the editable mode below was set installs again once.
STAMP = $(VENV)/.installed-compat-$(subst $(comma),-,$(EXTRAS))

.PHONY: install data demo test bench lint train-demo browser clean

# The stamp depends on the package metadata, so a second run with nothing changed is a no-op.
# editable_mode=compat puts the repository on sys.path (a .pth entry): a regular package found there
# beats a same-named folder in the working directory, which the default editable finder lets shadow
# it (`mkdir index; python -c 'from index import open_index'` failed).
$(STAMP): setup.cfg pyproject.toml setup.py index/ann/_f16rerank.c
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c 'import sys; assert sys.version_info[:2] >= (3, 11), sys.version' || { echo "imgsearch needs Python 3.11+"; exit 1; }
	$(PIP) install -q --disable-pip-version-check -e '.[$(EXTRAS)]' --config-settings editable_mode=compat
	@touch $@

install: $(STAMP)

data: install
	@bash scripts/fetch_data.sh "$(CACHE)" "$(PY)"

demo: install data
	$(VENV)/bin/imgsearch demo --port $(PORT)

# The suite covers the Ray path too (a local 2-CPU cluster), so it installs the `distributed` extra.
# Debian chromium + chromedriver for the web-page test in a real headless browser (system packages).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
	  echo "browser: installing Debian chromium and chromium-driver$$([ "$$(id -u)" = 0 ] || echo ' with sudo')"; \
	  S=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$S apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$S apt-get install -y -qq chromium chromium-driver >/dev/null; }

test: data browser
	@$(MAKE) --no-print-directory install EXTRAS=cpu,dev,distributed
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: data
	@$(MAKE) --no-print-directory install EXTRAS=cpu,dev,bench
	@for f in bench/bench_*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

# Trains the detector and embedder on the sample catalog's train products (2 CPU cores: ~20 min);
# `make demo` then uses demo-data/train/model.ckpt.
# PASSIVE: torch's OpenMP threads sleep instead of spinning, which on shared cores was 2-30x faster (BENCHMARKS.md).
train-demo: install data
	TORCHDYNAMO_DISABLE=1 OMP_WAIT_POLICY=PASSIVE $(PY) -m train.demo --workdir demo-data/train

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache demo-data
