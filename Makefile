# The two set-up commands of the README: `make demo` and `make test`. Both create the virtual
# environment and install what they need on a fresh machine (Python 3.11 and the package registries).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed
CHROMIUM := /usr/bin/chromium

.PHONY: demo demo-azurite test lint install clean serve stop bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Azurite (the Azure Storage emulator) for the tests and `journey demo --storage azurite`.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

# Debian's chromium for the Prefect UI test (Playwright drives it; `playwright install` does not work
# here). A no-op when it is installed; needs root or sudo the first time.
$(CHROMIUM):
	if [ "$$(id -u)" = 0 ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; \
	else sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; fi

install: $(STAMP) $(NODE_STAMP)

demo: $(STAMP)
	$(BIN)/journey demo

demo-azurite: $(STAMP) $(NODE_STAMP)
	$(BIN)/journey demo --storage azurite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) $(NODE_STAMP) $(CHROMIUM) lint
	$(BIN)/pytest

# A local Prefect server (http://127.0.0.1:4200), a process work pool and worker, and the
# deployments of infra/prefect.yaml; Ctrl-C or `make stop` stops them.
serve: $(STAMP)
	$(BIN)/journey serve

stop: $(STAMP)
	$(BIN)/journey stop

clean:
	rm -rf $(VENV) node_modules journey-data test-output

# The benchmark (bench/README.md): our flow, the floor and Cumulus ETL on generated inputs at each
# scale; results in bench/results/. BENCH_SCALES=S,M,L adds L (opt-in: about 10M FHIR resources).
BENCH_SCALES ?= S,M
BENCH_RUNS ?= 3
BENCH_PROFILE ?= M
bench: $(STAMP)
	$(BIN)/python -m bench.run --scales $(BENCH_SCALES) --runs $(BENCH_RUNS) --profile $(BENCH_PROFILE)
