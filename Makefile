# messenger-streams: every target sets up what it needs on a fresh machine (Python 3.11, Java 17, Maven).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python deploy/kafka/localkafka.py
CONFIG ?= deploy/connector.example.toml
RATE ?= 20
# make test's pytest processes: most tests wait on real timers and workers, not on the CPU (1 = serial)
TEST_WORKERS ?= 3

.PHONY: install run demo-reset test lint typecheck unit kafka-up kafka-down kafka-reset kafka-status kafka-fetch bench bench-history chaos schemas clean browser

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

# Stops the broker (SIGTERM, clean shutdown) and keeps its data: kafka-up brings back the same topics and offsets.
kafka-down: install
	$(KAFKA) down

# Stops the broker and deletes its data (every topic, offset and table changelog).
kafka-reset: install
	$(KAFKA) reset

kafka-status: install
	$(KAFKA) status

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy streams schemas

schemas: install
	$(BIN)/python -m schemas.export

unit: install
	$(BIN)/pytest -q -m "not kafka"

# Debian's Chromium and ChromeDriver for the admin page's browser test (#14): installed with apt-get as
# root (or sudo -n) when missing. Where that is impossible the test is skipped, except with CI=true (or 1,
# yes): then this step fails the run, and so would the test.
browser:
	@have() { { command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null 2>&1 \
	  && command -v chromedriver >/dev/null 2>&1; }; \
	if ! have && command -v apt-get >/dev/null 2>&1; then \
	  if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; else SUDO=no; fi; \
	  if [ "$$SUDO" != no ]; then \
	    echo "installing chromium and chromium-driver (the admin page's browser test)"; \
	    ($$SUDO apt-get update -qq && $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
	      chromium chromium-driver) >/dev/null 2>&1 || echo "browser: apt-get could not install them"; \
	  fi; \
	fi; \
	if have; then :; \
	else case "$$(printf %s "$${CI:-}" | tr A-Z a-z)" in \
	  1|true|yes) echo "browser: no chromium/chromedriver and no way to install them; CI needs the browser test" >&2; \
	    exit 1;; \
	  *) echo "browser: no chromium/chromedriver and no way to install them: the browser test is skipped";; \
	esac; fi

# Everything CI checks: lint, types, unit and integration tests on a real broker.
test: install kafka-fetch browser lint typecheck
	$(BIN)/pytest -q $(if $(filter-out 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadgroup)

# The main job: local Kafka, topics, a worker, demo traffic and a live summary until Ctrl-C.
run: install kafka-up
	MESSENGER_STREAMS_CONFIG=$(CONFIG) RATE=$(RATE) ./deploy/run-demo.sh

# Forget everything the demo did (its topics, offsets and tables); the broker and other apps keep theirs.
demo-reset: install kafka-up
	MESSENGER_STREAMS_CONFIG=$(CONFIG) ./deploy/run-demo.sh reset

bench: install kafka-up
	$(BIN)/python -m bench.run $(BENCH_ARGS)

# The chaos suite (docs/reliability.md): its own broker on free ports, every scenario, full size.
# e.g. make chaos CHAOS_ARGS="--runs 10"   make chaos CHAOS_ARGS="--scenarios a,c --size ci"
chaos: install kafka-fetch
	$(BIN)/python -m chaos.run $(CHAOS_ARGS)

# The history sink's write rate into an embedded PostgreSQL (docs/history.md): HISTORY_BENCH_ARGS="--conversations 50000"
bench-history: install kafka-up
	$(BIN)/python -m bench.history $(HISTORY_BENCH_ARGS)

clean:
	rm -rf .messenger-streams-data bench/results/*.tmp
