# messenger-streams: every target sets up what it needs on a fresh machine (Python 3.11, Java 17, Maven).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python deploy/kafka/localkafka.py
CONFIG ?= deploy/connector.example.toml
RATE ?= 20

.PHONY: install run test lint typecheck unit kafka-up kafka-down kafka-fetch bench schemas clean browser

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	@touch $(STAMP)

kafka-fetch: install
	$(KAFKA) fetch

kafka-up: install
	$(KAFKA) up

kafka-down: install
	$(KAFKA) down

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy streams schemas

schemas: install
	$(BIN)/python -m schemas.export

unit: install
	$(BIN)/pytest -q -m "not kafka"

# Debian's Chromium and ChromeDriver for the admin page's browser test (#14): installed with apt-get as
# root (or sudo -n) when missing. Where that is impossible the test is skipped; with CI=true it fails.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
	  echo "installing chromium and chromium-driver (browser test)"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) >/dev/null \
	    || echo "browser: could not install chromium / chromium-driver"; \
	elif command -v apt-get >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  echo "installing chromium and chromium-driver with sudo (browser test)"; \
	  (sudo -n apt-get update -qq && sudo -n env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver) \
	    >/dev/null || echo "browser: could not install chromium / chromium-driver"; \
	else echo "browser: no chromium/chromedriver and no way to install them: the browser test is skipped (fails with CI=true)"; fi

# Everything CI checks: lint, types, unit and integration tests on a real broker.
test: install kafka-fetch browser lint typecheck
	$(BIN)/pytest -q

# The main job: local Kafka, topics, a worker, demo traffic and a live summary until Ctrl-C.
run: install kafka-up
	MESSENGER_STREAMS_CONFIG=$(CONFIG) RATE=$(RATE) ./deploy/run-demo.sh

bench: install kafka-up
	$(BIN)/python -m bench.run $(BENCH_ARGS)

clean:
	rm -rf .messenger-streams-data bench/results/*.tmp
