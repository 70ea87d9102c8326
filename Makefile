# The two set-up commands of the README: `make demo` and `make test`. Both create the virtual
# environment and install what they need on a fresh machine (Python 3.11 and the package registries).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
NODE_STAMP := node_modules/.installed

.PHONY: demo demo-azurite test lint install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

# Azurite (the Azure Storage emulator) for the tests and `journey demo --storage azurite`.
$(NODE_STAMP): package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $(NODE_STAMP)

install: $(STAMP) $(NODE_STAMP)

demo: $(STAMP)
	$(BIN)/journey demo

demo-azurite: $(STAMP) $(NODE_STAMP)
	$(BIN)/journey demo --storage azurite

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

test: $(STAMP) $(NODE_STAMP) lint
	$(BIN)/pytest

clean:
	rm -rf $(VENV) node_modules journey-data test-output
