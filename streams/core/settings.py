"""Runtime settings from the environment: Kafka, topic names, ports and processing knobs.

One environment variable per setting, prefixed MESSENGER_STREAMS_ (KAFKA_BOOTSTRAP_SERVERS is read
as is). Frozen; secrets never appear in `repr` or dumps.
"""

from __future__ import annotations

from functools import cached_property

from pydantic import AliasChoices, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from streams.core.config import ConfigError, describe_validation_error


class Topics(BaseSettings):
    """Topic names (defaults from CONTRACT.md). MESSENGER_STREAMS_TOPIC_PREFIX prefixes them all."""

    model_config = SettingsConfigDict(env_prefix="MESSENGER_STREAMS_TOPIC_", frozen=True, extra="ignore")

    prefix: str = ""
    raw: str = "messenger.webhook.raw"
    dlq: str = "messenger.dlq"
    split: str = "messenger.events.split"
    events: str = "messenger.events"
    actions: str = "agent.actions"
    ticks: str = "conversations.ticks"
    outbound: str = "messenger.outbound"
    send_results: str = "messenger.send.results"
    dispatch_sent: str = "messenger.dispatch.sent"  # the dispatcher's sent log (co-partitioned with outbound)
    csat_responses: str = "csat.responses"
    csat_facts: str = "csat.facts"
    history: str = "conversations.history"
    skill_prefix: str = "skill."
    personas: str = "messenger.personas"  # personas the dispatcher created, per page (compacted; #17)

    def name(self, attr: str) -> str:
        """The full name of one topic, with the prefix."""
        return self.prefix + str(getattr(self, attr))

    def skill(self, skill_id: str) -> str:
        """The console topic of a skill."""
        return f"{self.prefix}{self.skill_prefix}{skill_id}"


class Settings(BaseSettings):
    """Everything that is not connector behaviour: where Kafka is and how the worker runs."""

    model_config = SettingsConfigDict(env_prefix="MESSENGER_STREAMS_", frozen=True, extra="ignore")

    bootstrap_servers: str = Field(
        default="127.0.0.1:9092",
        validation_alias=AliasChoices("KAFKA_BOOTSTRAP_SERVERS", "MESSENGER_STREAMS_BOOTSTRAP_SERVERS"),
    )
    app_id: str = Field(default="messenger-streams", description="Faust app id: consumer group and table prefix")
    partitions: int = Field(default=8, ge=1, le=1024, description="partitions of every topic we create")
    replication_factor: int = Field(default=1, ge=1)
    web_host: str = "0.0.0.0"  # noqa: S104 - the metrics endpoint is meant to be scraped
    web_port: int = Field(default=6066, ge=0, le=65535)
    datadir: str = ".messenger-streams-data"
    store: str = "memory://"
    max_body_bytes: int = Field(default=1_048_576, gt=0, description="raw bodies over this go to the DLQ")
    dedupe_horizon_seconds: int = Field(default=172_800, gt=0, description="drop duplicates seen this recently")
    dedupe_max_keys: int = Field(default=2_000, gt=0, description="idempotency keys kept per conversation")
    publish_events: bool = Field(
        default=False, description="also write every deduplicated event to messenger.events (audit, analytics)"
    )
    tick_interval_seconds: float = Field(default=1.0, gt=0, description="timer resolution of the conversation stage")
    commit_interval_seconds: float = Field(default=1.0, gt=0)
    producer_linger_ms: int = Field(default=5, ge=0)
    stream_buffer_maxsize: int = Field(default=16_384, gt=0)
    producer_buffer_max: int = Field(default=10_000, gt=0, description="table changelog records queued before a stall")
    log_level: str = "warn"
    # history store (issue 16): a PostgreSQL URI / conninfo, or `embedded[:dir]` for the pgserver of make run
    history_dsn: SecretStr | None = Field(default=None, description="PostgreSQL of the history store")
    history_group: str = Field(default="", description="consumer group of the history sink (default <app_id>-history)")
    history_batch_size: int = Field(default=2000, gt=0, le=50_000, description="records per sink transaction")
    history_topic_refresh_ms: int = Field(default=10_000, gt=0, description="new skill topics are found this fast")
    admin_password: SecretStr | None = Field(default=None, description="password of the admin HTTP endpoints")

    @cached_property
    def topics(self) -> Topics:
        return Topics()


def load_settings() -> Settings:
    """Settings from the environment; raises ConfigError with the variable and the problem."""
    try:
        settings = Settings()
        _ = settings.topics
    except ValidationError as exc:
        raise ConfigError(f"environment setting {describe_validation_error(exc)}") from None
    return settings
