# messenger-streams: every target sets up what it needs on a fresh machine (Python 3.11, Java 17, Maven).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
KAFKA := $(BIN)/python deploy/kafka/localkafka.py
CONFIG ?= deploy/connector.example.toml
RATE ?= 20

.PHONY: install run demo-reset test lint typecheck unit kafka-up kafka-down kafka-reset kafka-status kafka-fetch bench bench-history chaos schemas clean

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

# Everything CI checks: lint, types, unit and integration tests on a real broker.
test: install kafka-fetch lint typecheck
	$(BIN)/pytest -q

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
