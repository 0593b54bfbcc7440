# speakwatch: `make serve` runs the server on the built-in watching model; `make test` runs every test.
# Both create .venv and install the pinned dependency set (requirements/lock.txt) on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.speakwatch-installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast test-browser lint install bench browser-deps

install: $(STAMP)

$(STAMP): requirements/lock.txt pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "speakwatch needs $(PYTHON) (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@echo "installing the pinned dependency set into $(VENV) (first run: a few minutes)"
	$(BIN)/pip install --disable-pip-version-check --progress-bar off --no-deps -r requirements/lock.txt
	$(BIN)/pip install --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

serve: $(STAMP)
	$(BIN)/speakwatch serve --host $(HOST) --port $(PORT)

# Chromium and its driver come from Debian's packages; the browser test installs them if missing.
browser-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	  { echo "installing chromium + chromium-driver (Debian packages)"; \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
	    || echo "could not install chromium: browser tests will be skipped"; }

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) browser-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -ra -m "not engine and not browser and not training"

bench: $(STAMP)
	$(BIN)/python benchmarks/parallel.py
