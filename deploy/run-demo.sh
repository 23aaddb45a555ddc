#!/usr/bin/env bash
# `make run`: topics, a worker on the example config, demo traffic and a live summary until Ctrl-C.
# Stops what it started (worker, simulator); the broker stays up for the next run (make kafka-down).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export MESSENGER_STREAMS_CONFIG="${MESSENGER_STREAMS_CONFIG:-deploy/connector.example.toml}"
export MESSENGER_STREAMS_WEB_PORT="${MESSENGER_STREAMS_WEB_PORT:-6066}"
# history store (issue 16): the embedded PostgreSQL (pgserver) under the data dir unless a DSN is given
export MESSENGER_STREAMS_HISTORY_DSN="${MESSENGER_STREAMS_HISTORY_DSN:-embedded}"
LOG_DIR=.messenger-streams-data
mkdir -p "$LOG_DIR"
pids=()
cleanup() {
  trap - INT TERM EXIT
  echo; echo "stopping demo..."
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  echo "stopped (worker log: $LOG_DIR/worker.log; 'make kafka-down' stops Kafka)"
}
trap cleanup INT TERM EXIT

$BIN/messenger-streams topics create
$BIN/messenger-streams worker >"$LOG_DIR/worker.log" 2>&1 &
pids+=($!)
echo "worker started (pid ${pids[0]}), log in $LOG_DIR/worker.log; web on :$MESSENGER_STREAMS_WEB_PORT"
$BIN/messenger-streams history sink >"$LOG_DIR/history.log" 2>&1 &
pids+=($!)
echo "history sink started, log in $LOG_DIR/history.log; try http://127.0.0.1:$MESSENGER_STREAMS_WEB_PORT/conversations?q=refund"
$BIN/messenger-streams simulate --rate "${RATE:-20}" >"$LOG_DIR/simulate.log" 2>&1 &
pids+=($!)
echo "demo traffic at ${RATE:-20} records/s; live summary every 3 s, Ctrl-C to stop"
$BIN/messenger-streams summary --url "http://127.0.0.1:$MESSENGER_STREAMS_WEB_PORT/metrics" --interval 3
