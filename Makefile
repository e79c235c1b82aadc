# Two commands do all set-up on a fresh machine (Python 3.11 with pip):
#   make book   build the HTML book into _build/html/index.html
#   make test   run the unit tests and nbval over every chapter
# Both create .venv and install the pinned requirements once (a stamp file records it).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export TF_CPP_MIN_LOG_LEVEL := 3
export TF_ENABLE_ONEDNN_OPTS := 0
export KERAS_BACKEND := tensorflow

.PHONY: book browser-check test lint bench clean setup-cells

$(STAMP): requirements.txt pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

book: $(STAMP)
	$(BIN)/jupyter-book build . -W --keep-going

# The built site (run `make book` first) read page by page in headless Chromium at
# 1366 and 390 px: links, images, math, raw markup, lost text, overflow, figures,
# search, external requests; screenshots go to _build/screenshots/. Debian's chromium
# and chromium-driver are installed when missing (as root, or through sudo).
browser-check: $(STAMP)
	command -v chromium >/dev/null && command -v chromedriver >/dev/null || { \
		SUDO=$$(test "$$(id -u)" = 0 || echo sudo); \
		$$SUDO apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium chromium-driver; }
	$(BIN)/python .ci/browser_check.py _build/html

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/python -m pytest

bench: $(STAMP)
	for f in benchmarks/*.py; do echo "== $$f"; $(BIN)/python $$f || exit 1; done

# After changing repository.url in _config.yml: write it into every setup cell.
setup-cells: $(STAMP)
	$(BIN)/python .ci/setup_cell.py

clean:
	rm -rf _build
