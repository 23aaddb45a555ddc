"""The metric catalogue: every Prometheus metric the processor exports, its type and meaning.

docs/metrics.md lists the same names; tests check the Grafana dashboard only uses names from here.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import Counter, Gauge, Histogram

RAW_BODIES = Counter(
    "messenger_raw_bodies", "Raw webhook bodies consumed from messenger.webhook.raw"
)
EVENTS_IN = Counter(
    "messenger_events_in", "Normalized Messenger events split out of raw bodies, by kind", ["kind"]
)
DUPLICATES = Counter(
    "messenger_duplicates_dropped", "Events dropped as duplicates within the dedupe horizon, by kind", ["kind"]
)
DEAD_LETTERS = Counter(
    "messenger_dead_letters", "Records written to the dead-letter topic, by reason", ["reason"]
)
CONSOLE_EVENTS = Counter(
    "messenger_console_events", "Console events written to skill topics, by skill and type", ["skill", "type"]
)
OUTBOUND_REQUESTS = Counter(
    "messenger_outbound_requests", "Send API requests written to messenger.outbound, by origin", ["origin"]
)
ACTIONS_REJECTED = Counter(
    "messenger_actions_rejected", "Agent actions rejected, by reason", ["reason"]
)
UNKNOWN_PAGES = Counter(
    "messenger_unknown_page_events", "Events from pages not in the config, routed to the default skill"
)
OPEN_CONVERSATIONS = Gauge(
    "messenger_open_conversations", "Open conversations on this worker's partitions, by skill", ["skill"]
)
PROCESSING_LATENCY = Histogram(
    "messenger_processing_latency_seconds",
    "Time from a record's Kafka timestamp to the end of its processing, by stage",
    ["stage"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
CSAT_ANSWERS = Counter(
    "messenger_csat_answers", "CSAT answers counted (once each), by skill and score", ["skill", "score"]
)
CSAT_SURVEYS = Counter("messenger_csat_surveys_sent", "CSAT surveys sent, by skill", ["skill"])
CSAT_PERCENT = Gauge(
    "messenger_csat_percent",
    "Live CSAT % per skill, whole cluster, all time: answers scoring 4 or 5 over all answers",
    ["skill"],
)
WEBHOOK_REQUESTS = Counter(
    "messenger_webhook_requests", "POST /webhook requests, by result", ["result"]
)
SEND_RESULTS = Counter(
    "messenger_send_results", "Send API calls by the dispatcher, by result", ["result"]
)
PAGES_NEED_REAUTH = Gauge(
    "messenger_pages_need_reauth", "Pages whose access token Meta rejected (error 190)", ["page_id"]
)
SENT_LOG_IDS = Gauge(
    "messenger_dispatch_sent_log_ids",
    "Outbox ids the dispatcher remembers (its sent log, over the partitions it owns or kept)",
)
SENT_LOG_EVICTED = Counter(
    "messenger_dispatch_sent_log_evicted",
    "Outbox ids the dispatcher's sent log forgot by its count bounds before their age (raise the bounds if it grows)",
)
CSAT_RESPONSE_RATE = Gauge(
    "messenger_csat_response_rate",
    "CSAT answers over surveys sent (0-1), whole cluster, all time, by skill",
    ["skill"],
)
CSAT_AGGREGATE_ANSWERS = Gauge(
    "messenger_csat_aggregate_answers",
    "All-time CSAT answers of the whole cluster, by skill and score",
    ["skill", "score"],
)
CSAT_AGGREGATE_SURVEYS = Gauge(
    "messenger_csat_aggregate_surveys",
    "All-time CSAT surveys sent of the whole cluster, by skill",
    ["skill"],
)
CSAT_FACTS_SKIPPED = Counter(
    "messenger_csat_facts_skipped",
    "CSAT facts not counted here: redelivered, duplicate, invalid, or forwarded to their skill's partition",
    ["reason"],
)
MEDIA_STORED = Counter(
    "messenger_media_stored", "Inbound attachments kept by `messenger-streams media` (a media_stored event each)"
)
MEDIA_STORED_BYTES = Counter(
    "messenger_media_stored_bytes", "Bytes written to the media store (new files only: same content is one file)"
)
MEDIA_FAILURES = Counter(
    "messenger_media_failures",
    "Inbound attachments not stored, by reason (host_not_allowed, type_not_allowed, too_large, http_error, "
    "timeout, connection_error, write_error)",
    ["reason"],
)
QUEUE_DEPTH = Gauge(
    "messenger_queue_depth",
    "Open conversations waiting for an agent (unassigned) on this worker's partitions, by skill",
    ["skill"],
)
PROCESSING_ERRORS = Counter(
    "messenger_processing_errors",
    "Records whose processing raised (dead-lettered, traceback in the log), by stage and exception type",
    ["stage", "error"],
)
REDELIVERED = Counter(
    "messenger_redelivered_records",
    "Records skipped as already applied (redelivered after a crash or rebalance; pending outputs re-sent)",
    ["stage"],
)
RESENT = Counter(
    "messenger_outputs_resent",
    "Outputs sent again from a key's pending list (their first send may not have been acknowledged)",
    ["stage"],
)
UNITS_FLUSHED = Counter(
    "messenger_state_units_flushed",
    "Write/ack/send cycles of the state-first runner (state durable, then outputs acknowledged), by stage",
    ["stage"],
)
FLUSH_WAIT = Histogram(
    "messenger_state_flush_wait_seconds",
    "Time a state-first unit waits for Kafka's acks, by stage and phase (changelog: the state; outputs: "
    "what the state produced); the agent takes and decides the next batch meanwhile (the unit pipeline)",
    ["stage", "phase"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
)
STREAM_TIME_LAG = Gauge(
    "messenger_stream_time_lag_seconds",
    "Wall clock minus the stream time timers fire on, per partition of the conversation stage",
    ["partition"],
)
_WAIT_BUCKETS = (5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 21600.0, 86400.0)
FIRST_RESPONSE = Histogram(
    "messenger_first_response_seconds",
    "Time from a consumer opening a conversation to the first agent message, by skill",
    ["skill"],
    buckets=_WAIT_BUCKETS,
)
QUEUE_WAIT = Histogram(
    "messenger_queue_wait_seconds",
    "Time a conversation waited unassigned in a skill's queue, per queue stay, by skill",
    ["skill"],
    buckets=_WAIT_BUCKETS,
)
HANDLE = Histogram(
    "messenger_handle_seconds",
    "Time from opening to closing a conversation, by the skill it closed in",
    ["skill"],
    buckets=(60.0, 300.0, 600.0, 1800.0, 3600.0, 7200.0, 14400.0, 43200.0, 86400.0, 259200.0, 604800.0),
)
CONVERSATIONS_ABANDONED = Counter(
    "messenger_conversations_abandoned", "Conversations closed before any agent replied, by skill", ["skill"]
)
PAGE_MESSAGES = Counter(
    "messenger_page_messages",
    "Messages per page: inbound (consumer) and outbound (agent, automatic, survey, page); page is a connected "
    "page id or other",
    ["page", "direction"],
)
AGENT_MESSAGES = Counter(
    "messenger_agent_messages", "Agent messages sent, by agent (the first 50 agents seen, then other)", ["agent"]
)
TIMERS_FIRED = Counter(
    "messenger_conversation_timers_fired",
    "Conversation timers fired: idle (auto-close), warn, agent_nr (agent not responding), waiting",
    ["timer"],
)
# #15: bots and the checkout opt-in (counted from the rules' notes, except the router's and the listing)
BOT_HANDOFFS = Counter(
    "messenger_bot_handoffs",
    "Thread hand-overs between bots and agents: in (a bot passed the thread, a conversation opened), to_bot, "
    "released, taken (another app took it), taken_by_agent, kept (the customer wrote again), page_inbox",
    ["direction"],
)
THREAD_CONTROL = Counter(
    "messenger_thread_control_calls", "Thread-control calls written to messenger.outbound, by endpoint", ["endpoint"]
)
CHECKOUT_OPTINS = Counter(
    "messenger_checkout_optins",
    "Checkout opt-ins (checkbox, send_to_messenger) and the re-keying of checkbox conversations "
    "(claimed, handed_off, relinked)",
    ["event"],
)
ORDERS = Counter(
    "messenger_orders",
    "Merchant orders at conversation keys: received, waiting, matched, unmatched, forwarded, update_sent, "
    "update_held, stale",
    ["result"],
)
ORDERS_ROUTED = Counter(
    "messenger_orders_routed", "Orders read from commerce.orders, by the key they go to (psid, uref, ref) or invalid",
    ["via"],
)
ORDERS_UNMATCHED_LISTED = Gauge(
    "messenger_orders_unmatched_listed", "Unmatched orders this worker lists at GET /orders/unmatched"
)
PROFILES = Counter(
    "messenger_profiles",
    "User Profile lookups of the conversation rules: asked (a request to the dispatcher), fetched, failed",
    ["result"],
)
PERSONAS = Counter(
    "messenger_personas",
    "Persona lookups of the dispatcher: created, found (listed at Meta), failed (sent without), refused by Meta",
    ["result"],
)
PAGES = Gauge(
    "messenger_pages",
    "Pages in this process's page directory, by status (active, disabled, needs_reauth, disconnected)",
    ["status"],
)

CATALOGUE = (
    RAW_BODIES,
    EVENTS_IN,
    DUPLICATES,
    DEAD_LETTERS,
    CONSOLE_EVENTS,
    OUTBOUND_REQUESTS,
    ACTIONS_REJECTED,
    UNKNOWN_PAGES,
    OPEN_CONVERSATIONS,
    PROCESSING_LATENCY,
    CSAT_ANSWERS,
    CSAT_SURVEYS,
    CSAT_PERCENT,
    WEBHOOK_REQUESTS,
    SEND_RESULTS,
    PAGES_NEED_REAUTH,
    SENT_LOG_IDS,
    SENT_LOG_EVICTED,
    CSAT_RESPONSE_RATE,
    CSAT_AGGREGATE_ANSWERS,
    CSAT_AGGREGATE_SURVEYS,
    CSAT_FACTS_SKIPPED,
    MEDIA_STORED,
    MEDIA_STORED_BYTES,
    MEDIA_FAILURES,
    PROFILES,
    PERSONAS,
    QUEUE_DEPTH,
    PROCESSING_ERRORS,
    REDELIVERED,
    RESENT,
    UNITS_FLUSHED,
    FLUSH_WAIT,
    STREAM_TIME_LAG,
    FIRST_RESPONSE,
    QUEUE_WAIT,
    HANDLE,
    CONVERSATIONS_ABANDONED,
    PAGE_MESSAGES,
    AGENT_MESSAGES,
    TIMERS_FIRED,
    PAGES,
    BOT_HANDOFFS,
    THREAD_CONTROL,
    CHECKOUT_OPTINS,
    ORDERS,
    ORDERS_ROUTED,
    ORDERS_UNMATCHED_LISTED,
)


class BoundLabels:
    """Label children of one metric, bound once and reused on the per-event path."""

    def __init__(self, metric: Counter) -> None:
        self.metric = metric
        self.children: dict[tuple[str, ...], Counter] = {}

    def inc(self, *labels: str) -> None:
        child = self.children.get(labels)
        if child is None:
            child = self.children[labels] = self.metric.labels(*labels)
        child.inc()


TOP_AGENTS = 50  # agents with a label of their own in messenger_agent_messages; the rest are `other`


class _TopAgents:
    """The first `TOP_AGENTS` agent ids seen keep their label (a counter cannot move labels later)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.known: set[str] = set()

    def label(self, agent_id: str) -> str:
        if agent_id in self.known:
            return agent_id
        if len(self.known) < self.size:
            self.known.add(agent_id)
            return agent_id
        return "other"


_top_agents = _TopAgents(TOP_AGENTS)
_counters: dict[tuple[int, tuple[str, ...]], Counter] = {}
_BOTS_NOTES = {"handoff": BOT_HANDOFFS, "thread_control": THREAD_CONTROL, "optin": CHECKOUT_OPTINS, "order": ORDERS}
_HISTOGRAMS = {"first_response_seconds": FIRST_RESPONSE, "queue_wait_seconds": QUEUE_WAIT, "handle_seconds": HANDLE}


def _inc(metric: Counter, *labels: str) -> None:
    slot = (id(metric), labels)
    child = _counters.get(slot)
    if child is None:
        child = _counters[slot] = metric.labels(*labels) if labels else metric
    child.inc()


def record_notes(notes: Iterable[tuple[str, str]], figures: Iterable[tuple[str, str, float]] = ()) -> None:
    """Count a decision's notes and observe its figures (`Decision.notes`, `Decision.figures`).

    Labels stay bounded: skills are configured skills, pages connected page ids or `other`, agents the
    first `TOP_AGENTS` seen or `other`, reasons and kinds fixed sets. Notes for the stage's own
    gauges (`open+`, `open-`, `queue+`, `queue-`) and informational ones are left to the stage."""
    for name, label in notes:
        if name == "outbound":
            _inc(OUTBOUND_REQUESTS, label)
        elif name == "rejected":
            _inc(ACTIONS_REJECTED, label)
        elif name == "duplicate":
            _inc(DUPLICATES, label)
        elif name == "unknown_page":
            _inc(UNKNOWN_PAGES)
        elif name == "abandoned":
            _inc(CONVERSATIONS_ABANDONED, label)
        elif name == "page_in":
            _inc(PAGE_MESSAGES, label, "inbound")
        elif name == "page_out":
            _inc(PAGE_MESSAGES, label, "outbound")
        elif name == "agent_message":
            _inc(AGENT_MESSAGES, _top_agents.label(label))
        elif name == "timer":
            _inc(TIMERS_FIRED, label)
        elif name in _BOTS_NOTES:  # #15
            _inc(_BOTS_NOTES[name], label)
        elif name == "profile":
            _inc(PROFILES, label)  # #17: asked / fetched / failed
    for name, label, value in figures:
        histogram = _HISTOGRAMS.get(name)
        if histogram is not None:
            histogram.labels(label).observe(value)


def exported_names() -> set[str]:
    """Every sample name Prometheus will see (counters get _total, histograms _bucket/_sum/_count)."""
    names: set[str] = set()
    for metric in CATALOGUE:
        for family in metric.describe():
            names.add(family.name)
            if family.type == "counter":
                names.update({family.name + "_total", family.name + "_created"})
            elif family.type == "histogram":
                names.update({family.name + s for s in ("_bucket", "_sum", "_count", "_created")})
    return names
