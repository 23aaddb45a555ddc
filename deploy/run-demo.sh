#!/usr/bin/env bash
# `make run`: topics, a worker on the example config, the history sink, the onboarding admin page, demo
# traffic and a live summary until Ctrl-C.
#
#   deploy/run-demo.sh          run the demo (Ctrl-C or SIGTERM stops everything it started)
#   deploy/run-demo.sh reset    delete the demo's topics (its conversations, offsets, tables) and local data
#
# The demo has its own app id and topic prefix (MESSENGER_STREAMS_APP_ID, MESSENGER_STREAMS_TOPIC_PREFIX
# override them), so tests, scripts and other workers on the same broker never show up in it.
# Each process runs in its own process group (set -m): Ctrl-C reaches only this script, which stops
# every group it started (SIGTERM, then SIGKILL after STOP_SECONDS) and waits for them. If the worker
# exits by itself, the demo stops and shows the end of its log. The broker stays up (make kafka-down).
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=.venv/bin
export MESSENGER_STREAMS_CONFIG="${MESSENGER_STREAMS_CONFIG:-deploy/connector.example.toml}"
export MESSENGER_STREAMS_WEB_PORT="${MESSENGER_STREAMS_WEB_PORT:-6066}"
export MESSENGER_STREAMS_APP_ID="${MESSENGER_STREAMS_APP_ID:-messenger-streams-demo}"
export MESSENGER_STREAMS_TOPIC_PREFIX="${MESSENGER_STREAMS_TOPIC_PREFIX-demo.}"
export KAFKA_BOOTSTRAP_SERVERS="${KAFKA_BOOTSTRAP_SERVERS:-127.0.0.1:${KAFKA_PORT:-9092}}"
DEMO_DIR="${DEMO_DIR:-.messenger-streams-data/demo}"
export MESSENGER_STREAMS_DATADIR="${MESSENGER_STREAMS_DATADIR:-$DEMO_DIR/worker}"
# history store (issue 16): the embedded PostgreSQL (pgserver) under the data dir unless a DSN is given
export MESSENGER_STREAMS_HISTORY_DSN="${MESSENGER_STREAMS_HISTORY_DSN:-embedded}"
STOP_SECONDS="${STOP_SECONDS:-10}"

if [[ "${1:-}" == "reset" ]]; then
  $BIN/messenger-streams topics delete --yes
  rm -rf "$DEMO_DIR"
  echo "demo reset: topics of app id $MESSENGER_STREAMS_APP_ID, prefix '$MESSENGER_STREAMS_TOPIC_PREFIX' and $DEMO_DIR deleted"
  exit 0
fi

mkdir -p "$DEMO_DIR"
set -m  # every background job gets its own process group
pids=()
stopping=0

alive() { kill -0 "$1" 2>/dev/null; }

cleanup() {
  local status=$?
  trap - INT TERM EXIT
  [[ $stopping == 1 ]] && exit "$status"
  stopping=1
  echo; echo "stopping demo..."
  for p in "${pids[@]}"; do kill -TERM -- "-$p" 2>/dev/null || true; done
  # a deadline, not a poll: whatever still runs after STOP_SECONDS is killed
  (sleep "$STOP_SECONDS"; for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null && echo "killed process group $p"; done) &
  local killer=$!
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  kill -- "-$killer" 2>/dev/null || true
  wait "$killer" 2>/dev/null || true
  for p in "${pids[@]}"; do kill -KILL -- "-$p" 2>/dev/null || true; done  # anything a child left in its group
  echo "stopped (logs in $DEMO_DIR; 'make kafka-down' stops Kafka, 'make demo-reset' forgets the demo)"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 0' INT TERM  # runs the EXIT trap; Ctrl-C is the normal way to stop the demo

$BIN/messenger-streams topics create >"$DEMO_DIR/topics.log"
echo "topics ready (prefix '$MESSENGER_STREAMS_TOPIC_PREFIX', app id $MESSENGER_STREAMS_APP_ID, Kafka $KAFKA_BOOTSTRAP_SERVERS)"
$BIN/messenger-streams worker >"$DEMO_DIR/worker.log" 2>&1 &
worker=$!
pids+=("$worker")
$BIN/messenger-streams history sink >"$DEMO_DIR/history.log" 2>&1 &
pids+=($!)
# issue 14: the onboarding admin page on the demo's pages (no App Secret here: "Log in with Facebook" stays
# off). Its password goes to that process only (the worker's history pages stay open in the demo).
ADMIN_PASSWORD="${MESSENGER_STREAMS_ADMIN_PASSWORD:-demo-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')}"
ADMIN_PORT="${MESSENGER_STREAMS_ADMIN_PORT:-6068}"
MESSENGER_STREAMS_ADMIN_PASSWORD="$ADMIN_PASSWORD" MESSENGER_STREAMS_ADMIN_PORT="$ADMIN_PORT" \
  $BIN/messenger-streams admin >"$DEMO_DIR/admin.log" 2>&1 &
pids+=($!)
$BIN/messenger-streams simulate --rate "${RATE:-20}" >"$DEMO_DIR/simulate.log" 2>&1 &
pids+=($!)
echo "worker (pid $worker, log $DEMO_DIR/worker.log), history sink (log $DEMO_DIR/history.log), admin page (log \
$DEMO_DIR/admin.log), demo traffic at ${RATE:-20} records/s; Ctrl-C stops"
echo "history: http://127.0.0.1:$MESSENGER_STREAMS_WEB_PORT/conversations?q=refund"
echo "admin page: http://127.0.0.1:$ADMIN_PORT/  password: $ADMIN_PASSWORD"
$BIN/messenger-streams summary --url "http://127.0.0.1:$MESSENGER_STREAMS_WEB_PORT/metrics" --interval "${SUMMARY_INTERVAL:-3}" &
pids+=($!)

# Until one of them exits by itself (or a signal runs the traps above).
set +e
wait -n "${pids[@]}"
set -e
if ! alive "$worker"; then
  wait "$worker" 2>/dev/null; code=$?
  echo; echo "the worker exited (status $code); the end of $DEMO_DIR/worker.log:"
  tail -n 15 "$DEMO_DIR/worker.log"
  exit 1
fi
echo; echo "a demo process exited; see $DEMO_DIR/history.log, $DEMO_DIR/admin.log and $DEMO_DIR/simulate.log"
exit 1
