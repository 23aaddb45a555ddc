"""Runtime settings from the environment: Kafka, topic names, ports and processing knobs.

One environment variable per setting, prefixed MESSENGER_STREAMS_ (KAFKA_BOOTSTRAP_SERVERS is read
as is). Frozen; secrets never appear in `repr` or dumps. An empty variable counts as unset.

This module is also the catalogue of every MESSENGER_STREAMS_* variable, the ones a single command
reads for itself (webhook, dispatch, summary) included: `load_settings` validates them all, so a bad
value stops any command with one line naming the variable, and `unknown_variables` names the
closest known variable for a misspelt one. A new variable is a new field here.
"""

from __future__ import annotations

import base64
import difflib
import os
from collections.abc import Mapping
from functools import cached_property
from typing import Annotated, Any

import orjson
from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.core.config import ConfigError

PREFIX = "MESSENGER_STREAMS_"
TOPIC_PREFIX = PREFIX + "TOPIC_"

TopicName = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]+$", max_length=200)]
HttpUrl = Annotated[str, Field(pattern=r"^https?://[^\s/]+", max_length=2000)]
Port = Annotated[int, Field(ge=0, le=65535)]
LOG_LEVELS = ("debug", "info", "warn", "warning", "error", "critical", "crit")


class Topics(BaseSettings):
    """Topic names (defaults from CONTRACT.md). MESSENGER_STREAMS_TOPIC_PREFIX prefixes them all."""

    model_config = SettingsConfigDict(env_prefix=TOPIC_PREFIX, frozen=True, extra="ignore", env_ignore_empty=True)

    prefix: str = Field(default="", pattern=r"^[A-Za-z0-9._-]*$", max_length=100)
    raw: TopicName = "messenger.webhook.raw"
    dlq: TopicName = "messenger.dlq"
    split: TopicName = "messenger.events.split"
    events: TopicName = "messenger.events"
    actions: TopicName = "agent.actions"
    ticks: TopicName = "conversations.ticks"
    outbound: TopicName = "messenger.outbound"
    send_results: TopicName = "messenger.send.results"
    dispatch_sent: TopicName = "messenger.dispatch.sent"  # the dispatcher's sent log (co-partitioned with outbound)
    csat_responses: TopicName = "csat.responses"
    csat_facts: TopicName = "csat.facts"
    history: TopicName = "conversations.history"
    relay: TopicName = "conversations.relay"  # #15: records one conversation key sends another
    orders: TopicName = "commerce.orders"  # #15: merchant orders for the checkout opt-in
    orders_unmatched: TopicName = "commerce.orders.unmatched"  # #15: orders that met no opt-in (compacted)
    skill_prefix: TopicName = "skill."
    personas: TopicName = "messenger.personas"  # personas the dispatcher created, per page (compacted; #17)
    pages: TopicName = "connector.pages"  # the page directory (compacted, 1 partition; #14)
    pages_activity: TopicName = "connector.pages.activity"  # last event / last send per page (compacted; #14)

    def name(self, attr: str) -> str:
        """The full name of one topic, with the prefix."""
        return self.prefix + str(getattr(self, attr))

    def skill(self, skill_id: str) -> str:
        """The console topic of a skill."""
        return f"{self.prefix}{self.skill_prefix}{skill_id}"


class Settings(BaseSettings):
    """Everything that is not connector behaviour: where Kafka is and how the worker runs."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, frozen=True, extra="ignore", env_ignore_empty=True,
                                      populate_by_name=True)  # Settings(bootstrap_servers=...) in code and tests

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "MESSENGER_STREAMS_BOOTSTRAP_SERVERS"),
    )
    app_id: str = Field(
        default="messenger-streams",
        pattern=r"^[A-Za-z0-9._-]+$",
        max_length=100,
        description="Faust app id: consumer group and table prefix",
    )
    partitions: int = Field(default=8, ge=1, le=1024, description="partitions of every topic we create")
    replication_factor: int = Field(default=1, ge=1)
    web_host: str = Field(default="0.0.0.0", min_length=1)  # noqa: S104 - the metrics endpoint is meant to be scraped
    web_port: Port = 6066
    datadir: str = Field(default=".messenger-streams-data", min_length=1)
    store: str = Field(default="memory://", pattern=r"^(memory|rocksdb|aerospike)://")
    rocksdb_write_buffer_mb: int = Field(
        default=2, ge=1, le=1024,
        description="with rocksdb://: memtable size per table partition (two kept); faust's default is 64 MB (x3)",
    )
    rocksdb_block_cache_mb: int = Field(
        default=4, ge=1, le=65_536,
        description="with rocksdb://: block cache per table partition; faust's default is 2 GB",
    )
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="raw bodies over this go to the DLQ")
    dedupe_horizon_seconds: int = Field(default=172_800, gt=0, description="drop duplicates seen this recently")
    dedupe_max_keys: int = Field(default=2_000, gt=0, description="idempotency keys kept per conversation")
    publish_events: bool = Field(
        default=False, description="also write every deduplicated event to messenger.events (audit, analytics)"
    )
    one_hop: bool = Field(
        default=True,
        description="the conversation stage splits raw bodies and decides a body keyed by its conversation in "
        "place (no messenger.events.split round trip; the raw topic needs MESSENGER_STREAMS_PARTITIONS "
        "partitions); false: every body goes through split_webhooks",
    )
    tick_interval_seconds: float = Field(default=1.0, gt=0, description="timer resolution of the conversation stage")
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    producer_linger_ms: int = Field(
        default=5, ge=0,
        description="producer batching delay; aiokafka has one produce request in flight per broker, so a "
        "linger lets the stages' writes share requests (0 measured worse under live load, docs/benchmarks.md)",
    )
    fetch_min_bytes: int = Field(
        default=1, ge=1, le=52_428_800,
        description="the broker answers the worker's fetch once this much is ready, or after fetch_max_wait_ms "
        "(faust has no setting for either; 16384 with 5 ms: 22% less CPU at 1,000 records/s at equal latency, "
        "but +6-12 ms p50 at 1,600/s, docs/benchmarks.md)",
    )
    fetch_max_wait_ms: int = Field(
        default=1500, ge=0, le=30_000, description="the longest a fetch waits for fetch_min_bytes (faust's value)"
    )
    consumer_thread: bool = Field(
        default=False,
        description="run the worker's Kafka consumer in a thread of its own, as faust does; false: on the worker's "
        "event loop (no thread hop per fetch: live p50 a third to a half lower, drains a few percent slower; "
        "docs/benchmarks.md)",
    )
    stream_buffer_maxsize: int = Field(default=16_384, gt=0)
    producer_buffer_max: int = Field(default=10_000, gt=0, description="table changelog records queued before a stall")
    log_level: str = "warn"
    # --- state-first batches, dead letters, failover (issue 12, docs/architecture.md) ---
    batch_max: int = Field(default=500, ge=1, le=100_000, description="records per batch of the state-first runner")
    batch_within_ms: int = Field(
        default=5, ge=1, le=10_000, description="wait at most this long for a batch to fill before processing it"
    )
    batch_backlog_ms: int = Field(
        default=20, ge=0, le=10_000,
        description="while the fetched records waiting would fill a batch by themselves (a backlog), the next "
        "batches join it for at most this long (the conversation stage; 0: off)",
    )
    dead_letter_max_bytes: int = Field(
        default=900_000, ge=10_000, description="bigger dead letters keep a prefix of the original plus its SHA-256"
    )
    session_timeout_seconds: float = Field(
        default=8.0, ge=6.0, le=300.0, description="a silent worker's partitions move to the others after this"
    )
    heartbeat_interval_seconds: float = Field(default=2.0, gt=0, description="consumer group heartbeat")
    group_instance_id: str = Field(
        default="", description="static group membership id of this worker (unique per worker; empty: dynamic)"
    )
    # history store (issue 16): a PostgreSQL URI / conninfo, or `embedded[:dir]` for the pgserver of make run
    history_dsn: SecretStr | None = Field(default=None, description="PostgreSQL of the history store")
    history_group: str = Field(default="", description="consumer group of the history sink (default <app_id>-history)")
    history_batch_size: int = Field(default=2000, gt=0, le=50_000, description="records per sink transaction")
    history_topic_refresh_ms: int = Field(default=10_000, gt=0, description="new skill topics are found this fast")
    admin_password: SecretStr | None = Field(
        default=None, description="password of the admin page (`admin`) and of the worker's admin HTTP endpoints"
    )

    # Read by one command each (their defaults live there); declared here to be validated up front.
    config_path: str | None = Field(
        default=None, validation_alias="MESSENGER_STREAMS_CONFIG", description="the connector's TOML file"
    )
    summary_url: HttpUrl | None = Field(default=None, description="summary: the worker's /metrics URL")
    webhook_host: str | None = Field(default=None, description="webhook: listen address")
    webhook_port: Port | None = Field(default=None, description="webhook: listen port")
    app_secret: SecretStr | None = Field(default=None, description="webhook: Meta's App Secret")
    app_secret_file: str | None = Field(default=None, description="webhook: file holding the App Secret")
    verify_token: SecretStr | None = Field(default=None, description="webhook: token of Meta's handshake")
    graph_url: HttpUrl | None = Field(default=None, description="dispatch: Graph API base URL")
    graph_api_version: str | None = Field(
        default=None, pattern=r"^v\d+(\.\d+)?$", description="dispatch: Graph API version"
    )
    page_tokens: SecretStr | None = Field(default=None, description="dispatch: JSON object page_id → page token")
    page_tokens_file: str | None = Field(default=None, description="dispatch: file of page tokens")
    rate_per_page: float | None = Field(default=None, gt=0, description="dispatch: sends per second per page")
    dispatch_web_port: Port | None = Field(default=None, description="dispatch: port of /metrics and /healthz")
    sent_log_days: float | None = Field(default=None, gt=0, description="dispatch: older outbound is not sent")
    media_web_port: Port | None = Field(default=None, description="media (#17): port of /metrics and /healthz")
    # issue 14: the page directory's tokens, the `pages` commands and the admin page (docs/onboarding.md)
    pages_key: SecretStr | None = Field(
        default=None, description="Fernet key(s) of the page tokens in connector.pages (comma-separated: rotation)"
    )
    admin_host: str | None = Field(default=None, min_length=1, description="admin: listen address (127.0.0.1)")
    admin_port: Port | None = Field(default=None, description="admin: listen port (6068)")
    admin_public_url: HttpUrl | None = Field(default=None, description="admin: the URL people open (OAuth redirect)")
    facebook_dialog_url: HttpUrl | None = Field(
        default=None, description="admin: base URL of Facebook Login's dialog (tests: the fake Graph API)"
    )

    @field_validator("bootstrap_servers")
    @classmethod
    def _host_ports(cls, v: str) -> str:
        parts = [p.strip() for p in v.split(",") if p.strip()]
        if not parts:
            raise ValueError("give at least one host:port")
        for part in parts:
            host, sep, port = part.rpartition(":")
            if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
                raise ValueError(f"{part!r} is not host:port")
        return ",".join(parts)

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        if v.lower() not in LOG_LEVELS:
            raise ValueError(f"one of {', '.join(LOG_LEVELS)}")
        return v.lower()

    @field_validator("page_tokens")
    @classmethod
    def _token_object(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            try:
                data = orjson.loads(v.get_secret_value())
            except orjson.JSONDecodeError:
                data = None
            if not isinstance(data, dict) or not all(isinstance(t, str) and t for t in data.values()):
                raise ValueError("must be a JSON object of non-empty strings page_id → token")
        return v

    @field_validator("pages_key")
    @classmethod
    def _fernet_keys(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            keys = [k.strip() for k in v.get_secret_value().split(",") if k.strip()]
            if not keys or not all(_is_fernet_key(k) for k in keys):
                raise ValueError("not a Fernet key (32 url-safe base64-encoded bytes; make one with "
                                 "`messenger-streams pages keygen`; several: comma-separated)")
        return v

    @cached_property
    def topics(self) -> Topics:
        return Topics()


def _is_fernet_key(key: str) -> bool:
    try:
        return len(base64.urlsafe_b64decode(key.encode("ascii"))) == 32 and len(key) == 44
    except (ValueError, UnicodeEncodeError):
        return False


def _field_variables(model: type[BaseSettings], prefix: str) -> dict[str, str]:
    """Field name → the environment variable(s) that set it (the first one for messages)."""
    out: dict[str, str] = {}
    for name, info in model.model_fields.items():
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            out[name] = " or ".join(str(c) for c in alias.choices)
        elif isinstance(alias, str):
            out[name] = alias
        else:
            out[name] = prefix + name.upper()
    return out


def known_variables() -> dict[str, Any]:
    """Every environment variable the settings read → its field's info (type, default, description)."""
    out: dict[str, Any] = {}
    for model, prefix in ((Settings, PREFIX), (Topics, TOPIC_PREFIX)):
        for name, variables in _field_variables(model, prefix).items():
            for variable in variables.split(" or "):
                out[variable] = model.model_fields[name]
    return out


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A warning for each MESSENGER_STREAMS_* variable that no setting reads, naming the closest known one."""
    known = known_variables()
    upper = {k.upper() for k in known}
    lines = []
    for variable in sorted(environ):
        if variable.upper().startswith(PREFIX) and variable.upper() not in upper:
            close = difflib.get_close_matches(variable.upper(), sorted(upper), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]}?" if close else "see the README for the known ones"
            lines.append(f"unknown environment variable {variable} ({hint})")
    return lines


def _describe(exc: ValidationError, model: type[BaseSettings], prefix: str) -> str:
    err = exc.errors()[0]
    loc = str(err["loc"][0]) if err["loc"] else ""
    names = _field_variables(model, prefix)
    field = loc if loc in names else next((f for f, v in names.items() if loc in v.split(" or ")), loc)
    choices = names.get(field, loc).split(" or ")
    present = {k.upper() for k in os.environ}
    variable = next((c for c in choices if c.upper() in present), choices[0])  # the one that was set
    info = model.model_fields.get(field)
    secret = info is not None and "SecretStr" in str(info.annotation)
    shown = "" if secret or "input" not in err else f"={str(err['input'])[:80]!r}"
    return f"{variable}{shown}: {err['msg'].removeprefix('Value error, ')}"


def load_settings() -> Settings:
    """Settings from the environment; raises ConfigError naming the variable and the problem."""
    try:
        settings = Settings()
    except ValidationError as exc:
        raise ConfigError(f"environment: {_describe(exc, Settings, PREFIX)}") from None
    try:
        _ = settings.topics
    except ValidationError as exc:
        raise ConfigError(f"environment: {_describe(exc, Topics, TOPIC_PREFIX)}") from None
    return settings
