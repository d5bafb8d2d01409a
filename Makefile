# Everything runs from the repo's own virtualenv (.venv), created when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint fmt validate-deploy ci clean

install: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "Python 3.11+ is required")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## The service on embedded PostgreSQL, Redis and an SMTP sink under .dev/ (port 8000).
run: install
	$(BIN)/orders dev

## The whole test suite against real PostgreSQL, Redis and SMTP (machine's or embedded).
test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check orders tests infra
	$(BIN)/ruff format --check orders

fmt: install
	$(BIN)/ruff format orders
	$(BIN)/ruff check --fix orders tests infra

validate-deploy:
	bash .ci/validate-deploy

ci: lint test validate-deploy

clean:
	rm -rf $(VENV) .dev .pytest_cache .ruff_cache *.egg-info
