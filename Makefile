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

# Chromium and its driver come from Debian's packages (the browser tests drive $(CHROMIUM) through
# $(CHROMEDRIVER)); installed here if missing. No browser is an error, not a skip: `make test` stops.
# SPEAKWATCH_SKIP_BROWSER=1 is the explicit opt-out (the browser tests are then reported as skipped).
CHROMIUM := /usr/bin/chromium
CHROMEDRIVER := /usr/bin/chromedriver

browser-deps:
	@case "$$SPEAKWATCH_SKIP_BROWSER" in 1|true|yes) \
	  echo "SPEAKWATCH_SKIP_BROWSER=$$SPEAKWATCH_SKIP_BROWSER: not installing chromium, the browser tests will be skipped"; \
	  exit 0;; esac; \
	test -x $(CHROMIUM) && test -x $(CHROMEDRIVER) && exit 0; \
	echo "installing chromium + chromium-driver (Debian packages)"; \
	(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null); \
	test -x $(CHROMIUM) && test -x $(CHROMEDRIVER) || { \
	  echo "error: the browser tests need $(CHROMIUM) and $(CHROMEDRIVER), which could not be installed."; \
	  echo "  install them (as root: apt-get install chromium chromium-driver) and run 'make test' again,"; \
	  echo "  or opt out explicitly: 'make test SPEAKWATCH_SKIP_BROWSER=1' (or 'make test-fast')."; \
	  exit 1; }

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) browser-deps
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -p no:cacheprovider -ra

test-fast: $(STAMP)
	$(BIN)/python -m pytest -p no:cacheprovider -ra -m "not engine and not browser and not training"

bench: $(STAMP)
	$(BIN)/python benchmarks/parallel.py
