# Everything runs from the repo's own virtualenv (.venv), created when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install run test lint fmt validate-deploy image check-wheels newer-python ci clean load bench openapi client demo e2e

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

## Locust checkout load against a running service (LOAD_HOST, or $ORDERS_URL), then its
## invariants checked in PostgreSQL ($ORDERS_DATABASE_URL; tokens from $ORDERS_JWT_SECRET).
## Orders are paid through webhooks signed with $ORDERS_PAYMENT_WEBHOOK_SECRET where the
## service has them (LOAD_PAYMENTS=auto|on|off); give the service's ORDERS_PAYMENT_TIMEOUT_S
## to check expiry, ORDERS_NATS_URL to check the order.paid events (docs/PERFORMANCE.md).
## CSV stats and a summary in infra/locust/results/. LOAD_SERVER_PID=<pid> adds worker RSS.
LOAD_HOST     ?= $(or $(ORDERS_URL),http://127.0.0.1:8000)
LOAD_USERS    ?= 20
LOAD_SPAWN    ?= 5
LOAD_DURATION ?= 60s
load: install
	@mkdir -p infra/locust/results
	LOAD_SUMMARY=infra/locust/results/summary.json $(BIN)/locust -f infra/locust/locustfile.py --headless \
		--host $(LOAD_HOST) -u $(LOAD_USERS) -r $(LOAD_SPAWN) -t $(LOAD_DURATION) --stop-timeout 10 \
		--csv infra/locust/results/load --only-summary

## The service against its three ceilings (pgbench, a bare endpoint, a bare one-row asyncpg read) with wrk and
## Postfix's smtp-sink, CPU per request by process: ~5 minutes (infra/bench/bench.py, docs/PERFORMANCE.md).
bench: install
	$(BIN)/python infra/bench/bench.py

## docs/openapi.json, the app's OpenAPI description (a test fails while it differs from what the app serves).
openapi: install
	$(BIN)/python -m orders.api.openapi docs/openapi.json

## The checkout example (examples/checkout/): Node packages from its lock file.
CHECKOUT := examples/checkout
NODE_MODULES := $(CHECKOUT)/node_modules/.package-lock.json

$(NODE_MODULES): $(CHECKOUT)/package-lock.json
	cd $(CHECKOUT) && npm ci --no-audit --no-fund

## docs/openapi.json from the app, then the checkout's typed client from it (src/api/).
client: openapi $(NODE_MODULES)
	cd $(CHECKOUT) && npm run --silent client

## `orders dev` with CORS for the checkout page, its test payment provider on :8001 (examples/checkout/provider.py,
## with the service's webhook secret), and the page on http://127.0.0.1:5173 (a token in its address).
demo: install $(NODE_MODULES)
	cd $(CHECKOUT) && npm run --silent build
	$(BIN)/python $(CHECKOUT)/demo.py

## The checkout page in Debian's Chromium against a real service (PostgreSQL, Redis, SMTP sink) and the test payment
## provider, plus a second service that expires unpaid orders after 3 s; fails on a stale client.
e2e: install $(NODE_MODULES)
	cd $(CHECKOUT) && npm run --silent client:check && npm run --silent build
	$(BIN)/python $(CHECKOUT)/e2e/run.py

lint: install
	$(BIN)/ruff check orders tests infra examples
	$(BIN)/ruff format --check orders examples

fmt: install
	$(BIN)/ruff format orders examples
	$(BIN)/ruff check --fix orders tests infra examples

validate-deploy:
	bash .ci/validate-deploy

## The container image (infra/image/build): podman when installed, else docker.
## BASE_IMAGE=local: a Debian bookworm base made here with mmdebstrap, for machines with
## no container registry; empty: the Dockerfile's python:3.11-slim-bookworm.
## `bash .ci/image` builds it that way and runs it the way production does.
IMAGE      ?= orders:latest
BASE_IMAGE ?=
image:
	IMAGE='$(IMAGE)' BASE_IMAGE='$(BASE_IMAGE)' bash infra/image/build

## Every dependency of .[dev] installs from wheels on CPython 3.11-3.14, Linux x86_64/aarch64 and macOS.
check-wheels: install
	$(BIN)/python .ci/check-wheels

## make install and a smoke test of make run on Debian 13's Python 3.13 (root: chroot, namespaces).
newer-python:
	bash .ci/newer-python

ci: lint test e2e check-wheels newer-python validate-deploy

clean:
	rm -rf $(VENV) .dev .pytest_cache .ruff_cache *.egg-info $(CHECKOUT)/node_modules $(CHECKOUT)/dist
