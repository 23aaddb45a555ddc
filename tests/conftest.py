"""Shared fixtures: a real Kafka broker for the session, workers with fresh topics per test."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from streams.history.embedded import start_embedded, stop_embedded
from tests.kafkatools import KafkaIO, Worker, delete_worker_topics, kafka_broker, worker_env
from tests.pgtools import new_database

SAMPLES = Path(__file__).parent / "samples"

BASE_CONFIG = """
[account]
app_id = "950864918368986"
human_agent_tag = true

[routing]
mode = "entry_point"
default_skill = "general"

[[pages]]
page_id = "1691462197845448"
skill = "billing"
locale = "en_US"

[[pages]]
page_id = "298733926841562"
skill = "support"
locale = "es_ES"

[external_user]
agent_id = "connector"
nickname = "FB External User"
"""


def pytest_configure(config: pytest.Config) -> None:
    """With pytest-xdist (`make test` runs `-n TEST_WORKERS`): one broker for every test process,
    started here in the controller before the processes start; they inherit its address in
    KAFKA_BOOTSTRAP_SERVERS. When none can be started here, each process tries on its own
    (`kafka_bootstrap`, which fails the run under CI)."""
    if hasattr(config, "workerinput") or not getattr(config.option, "numprocesses", None):
        return
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        return
    root = Path(tempfile.mkdtemp(prefix="ms-test-broker-"))
    stack = contextlib.ExitStack()
    stack.callback(shutil.rmtree, root, True)
    try:
        os.environ["KAFKA_BOOTSTRAP_SERVERS"] = stack.enter_context(kafka_broker(root))
    except RuntimeError:
        stack.close()
        return
    stack.callback(os.environ.pop, "KAFKA_BOOTSTRAP_SERVERS", None)
    config.stash[_SHARED_BROKER] = stack


def pytest_unconfigure(config: pytest.Config) -> None:
    stack = config.stash.get(_SHARED_BROKER, None)
    if stack is not None:
        stack.close()


_SHARED_BROKER = pytest.StashKey[contextlib.ExitStack]()


@pytest.fixture(scope="session")
def kafka_bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real broker for the whole run. With CI=true a missing broker fails the run loudly."""
    try:
        with kafka_broker(tmp_path_factory.mktemp("broker")) as bootstrap:
            yield bootstrap
    except RuntimeError as exc:
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(f"CI needs a Kafka broker: {exc}", pytrace=False)
        pytest.skip(str(exc))


@pytest.fixture
async def kafka(kafka_bootstrap: str) -> AsyncIterator[KafkaIO]:
    io = KafkaIO(kafka_bootstrap)
    try:
        yield io
    finally:
        await io.close()


@pytest.fixture
def make_worker(kafka_bootstrap: str, tmp_path: Path) -> Iterator[Callable[..., Worker]]:
    """Start `messenger-streams worker` subprocesses on fresh topics; stopped at teardown."""
    workers: list[Worker] = []

    def factory(config: str = BASE_CONFIG, partitions: int = 2, start: bool = True, **env: str) -> Worker:
        wdir = tmp_path / f"worker{len(workers)}"
        wdir.mkdir()
        w = Worker(env=worker_env(kafka_bootstrap, wdir, config, partitions, **env), log_path=wdir / "worker.log")
        workers.append(w)
        if start:
            w.start()
        return w

    yield factory
    for w in workers:
        w.stop()
    # a developer's long-lived broker (make kafka-up) would otherwise collect every test's topics
    # until it runs out of file handles: delete what these workers created
    delete_worker_topics(kafka_bootstrap, workers)


# --- the embedded PostgreSQL of the history store (issue 16) -------------------------------------


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """One embedded PostgreSQL 16 (pgserver) for the run, deleted at exit: its connection URI.

    Not under pytest's temp dir: pytest resets that tree to mode 0700 at every run, and the server
    runs as its own user (pgserver's when we are root). HISTORY_TEST_POSTGRES_URI runs the history
    tests on another server instead (another PostgreSQL version): each test creates a database there."""
    if other := os.environ.get("HISTORY_TEST_POSTGRES_URI"):
        yield other
        return
    base = Path(tempfile.mkdtemp(prefix="ms-pg-"))
    try:
        yield start_embedded(base / "data", delete_on_exit=True)
    finally:
        stop_embedded(base / "data")
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def history_dsn(pg_server: str) -> str:
    """A fresh, empty database on the embedded server for one test."""
    return new_database(pg_server)
