# Two entry points: `make demo` (install, then run the main job on the tiny zoo) and `make test`
# (install, the browser for the UI test and PostgreSQL for the server-database tests included, then
# the whole suite); `make test-fast` runs the tests that need no Prefect server and take seconds
# each, for day-to-day work.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install browser postgres demo test test-fast clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[dev,ray]'
	touch $@

install: $(BIN)/.installed
	@echo "music, prefect and ray are in $(BIN): run 'source $(BIN)/activate' in a shell to put them on PATH"

demo: install
	$(BIN)/music zoo build
	$(BIN)/music pipeline data_specs/train_tiny.yaml
	@echo "next: 'source $(BIN)/activate', then the README's Commands and Operations"

browser:
	@bash tests/install_browser.sh

postgres:
	@bash tests/install_postgres.sh

test: install browser postgres
	$(BIN)/python -m pytest

test-fast: install
	$(BIN)/python -m pytest -m "not prefect and not slow"

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
