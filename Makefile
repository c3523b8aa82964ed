# The two commands of the README:
#   make run    set up .venv and start the daemon on ./gateway.toml
#   make test   set up .venv with the test extras, check the architecture and the types, run the
#               whole test suite
#   make check  the architecture contracts (lint-imports) and the type checker (mypy --strict) alone
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test check system-deps clean

$(BIN)/.installed: pyproject.toml
	@./scripts/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	$(BIN)/pip install --quiet -e examples/storage_flat  # the example third-party plugin: the contract suites test it
	@touch $@

run: $(BIN)/.installed
	$(BIN)/gateway serve --config gateway.toml

check: $(BIN)/.installed
	$(BIN)/lint-imports --no-cache
	$(BIN)/mypy

test: check
	$(BIN)/pytest

system-deps:
	@./scripts/system-deps

clean:
	rm -rf $(VENV) var *.egg-info
