"""The project's own single-node Apache Kafka (KRaft), from Maven Central jars: no Docker.

    python deploy/kafka/localkafka.py up     # fetch jars (cached), format once, start, wait for metadata
    python deploy/kafka/localkafka.py down   # stop (SIGTERM, wait for a clean shutdown); data kept
    python deploy/kafka/localkafka.py reset  # stop and delete its data: every topic, offset and changelog
    python deploy/kafka/localkafka.py status

`up`, `down` and `reset` are idempotent; `up` after `down` brings back the same topics and offsets.
The broker listens on 127.0.0.1:$KAFKA_PORT (default 9092), its controller on
$KAFKA_CONTROLLER_PORT (default the next port); its state lives in $KAFKA_HOME (default .kafka/ at
the project root). $KAFKA_OPTS adds JVM options after the defaults, as in Kafka's own scripts (e.g.
`-Xlog:gc:file=gc.log` logs the broker's GC pauses). Topics are never created implicitly
(`auto.create.topics.enable=false`): the processor creates what it uses, with the right partition
count. Tests import `LocalKafka` to start a broker of their own when none is running.
"""

from __future__ import annotations

import argparse
import base64
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
LIBS = HERE / "target" / "kafka-libs"

LOG4J2 = """\
appender.c.type=Console
appender.c.name=C
appender.c.layout.type=PatternLayout
appender.c.layout.pattern=[%d] %p %m (%c)%n
rootLogger.level=WARN
rootLogger.appenderRef.c.ref=C
logger.started.name=kafka.server.KafkaRaftServer
logger.started.level=INFO
"""

SERVER_PROPERTIES = """\
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:{controller_port}
listeners=PLAINTEXT://127.0.0.1:{port},CONTROLLER://127.0.0.1:{controller_port}
advertised.listeners=PLAINTEXT://127.0.0.1:{port}
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs={data_dir}
num.partitions=1
offsets.topic.replication.factor=1
offsets.topic.num.partitions=1
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=1
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
auto.create.topics.enable=false
log.cleaner.dedupe.buffer.size=2097152
log.segment.bytes=16777216
log.segment.delete.delay.ms=1000
"""
# log.segment.delete.delay.ms: a deleted topic's files go within a second (Kafka's default, 60 s, made
# the bench's tidying of one phase land in the middle of a later one: docs/benchmarks.md, stop 33)


class KafkaError(RuntimeError):
    """The local broker could not be fetched, started or stopped."""


def fetch_jars() -> Path:
    """Resolve the broker classpath with Maven (cached in ~/.m2 and deploy/kafka/target)."""
    if LIBS.is_dir() and any(LIBS.glob("kafka_2.13-*.jar")):
        return LIBS
    if not shutil.which("mvn"):
        raise KafkaError("mvn not found: install Maven (and Java 17) to fetch Kafka's jars")
    print("fetching Apache Kafka jars from Maven Central (first run only)...", file=sys.stderr)
    res = subprocess.run(
        ["mvn", "-B", "-q", "-f", str(HERE / "pom.xml"), "package"],
        capture_output=True,
        text=True,
        check=False,
    )
    if res.returncode != 0:
        raise KafkaError("maven could not fetch Kafka's jars:\n" + res.stdout[-2000:] + res.stderr[-2000:])
    return LIBS


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """True when something accepts TCP connections on host:port."""
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def free_port() -> int:
    """A port nobody listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_metadata(bootstrap: str, timeout: float = 90.0, alive: Callable[[], bool] | None = None) -> None:
    """Poll the broker until it answers a metadata request with at least one broker (or, when
    `alive` says the broker's process is gone, fail at once)."""
    import asyncio
    import logging

    from aiokafka.admin import AIOKafkaAdminClient

    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # "Unable connect" while it boots

    async def probe() -> bool:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=3000)
        try:
            await admin.start()
            meta = await admin.describe_cluster()
            return bool(meta.get("brokers"))
        except Exception:  # noqa: BLE001 - any failure means "not ready yet"
            return False
        finally:
            try:
                await admin.close()
            except Exception:  # noqa: BLE001,S110 - closing a half-started client
                pass

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if asyncio.run(probe()):
            return
        if alive is not None and not alive():
            raise KafkaError(f"Kafka at {bootstrap} exited while starting")
        time.sleep(0.5)
    raise KafkaError(f"Kafka at {bootstrap} did not serve metadata within {timeout:.0f}s")


class BadOptions(KafkaError):
    """$KAFKA_OPTS cannot be split into options (an unclosed quote)."""


def extra_jvm_options() -> list[str]:
    """$KAFKA_OPTS split as a shell would; BadOptions names what is wrong."""
    raw = os.environ.get("KAFKA_OPTS", "")
    try:
        return shlex.split(raw)
    except ValueError as exc:
        raise BadOptions(f"KAFKA_OPTS cannot be split into JVM options ({exc}): {raw!r}") from None


class LocalKafka:
    """One single-node KRaft broker in a subprocess, with its data under `home`."""

    def __init__(self, home: Path, port: int = 9092, controller_port: int | None = None) -> None:
        self.home = home
        self.port = port
        self.controller_port = controller_port or port + 1
        self.pidfile = home / "kafka.pid"
        self.logfile = home / "kafka.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def pid(self) -> int | None:
        """The broker's pid if it is running (a live process started from this home's properties)."""
        if self._proc is not None and self._proc.poll() is not None:
            return None  # our own child has exited (possibly still a zombie until reaped: poll reaps it)
        try:
            pid = int(self.pidfile.read_text().strip())
        except (OSError, ValueError):
            return None
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        if stat.rpartition(")")[2].split()[:1] == ["Z"]:
            return None  # exited, not yet reaped by its parent
        if b"kafka.Kafka" not in cmdline or str(self.home / "server.properties").encode() not in cmdline:
            return None  # the pid was reused by another process
        return pid

    def _java(self, *args: str, log: Path | None = None, background: bool = False) -> subprocess.Popen[bytes]:
        java = shutil.which("java")
        if java is None:
            raise KafkaError("java not found: install a Java 17 runtime")
        cmd = [
            java,
            "-Xms256m",
            "-Xmx768m",
            "-XX:+UseG1GC",
            "-XX:MaxGCPauseMillis=20",
            "-Djava.awt.headless=true",
            f"-Dkafka.logs.dir={self.home / 'logs'}",
            f"-Dlog4j2.configurationFile={self.home / 'log4j2.properties'}",
            *extra_jvm_options(),  # after ours: a repeated -D or -X wins
            "-cp",
            str(LIBS / "*"),
            *args,
        ]
        out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - handed to the child
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=background)

    def up(self, timeout: float = 90.0) -> None:
        """Fetch, format and start the broker unless it already runs; wait until it serves metadata."""
        if self.pid() is not None:
            wait_for_metadata(self.bootstrap, timeout)
            return
        if port_open(self.port):
            raise KafkaError(f"port {self.port} is taken by another process; set KAFKA_PORT")
        fetch_jars()
        self.home.mkdir(parents=True, exist_ok=True)
        data = self.home / "data"
        (self.home / "log4j2.properties").write_text(LOG4J2)
        props = self.home / "server.properties"
        props.write_text(
            SERVER_PROPERTIES.format(port=self.port, controller_port=self.controller_port, data_dir=data)
        )
        if not (data / "meta.properties").exists():
            cluster_id = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
            if cluster_id.startswith("-"):
                cluster_id = "A" + cluster_id[1:]
            fmt = self._java("kafka.tools.StorageTool", "format", "-t", cluster_id, "-c", str(props), log=self.logfile)
            if fmt.wait(120) != 0:
                raise KafkaError(f"formatting KRaft storage failed; see {self.logfile}")
        proc = self._java("kafka.Kafka", str(props), log=self.logfile, background=True)
        self._proc = proc
        self.pidfile.write_text(str(proc.pid))
        try:
            wait_for_metadata(self.bootstrap, timeout, alive=lambda: proc.poll() is None)
        except KafkaError as exc:
            self.down()
            raise KafkaError(f"{exc}; see {self.logfile}") from None

    def down(self, timeout: float = 60.0) -> None:
        """Stop the broker and keep its data: SIGTERM, then wait for its clean shutdown (it flushes
        and closes its logs); SIGKILL only if it is still running after `timeout` seconds."""
        pid = self.pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.pid() is not None:
            time.sleep(0.2)  # polling another process' exit: there is no event to wait on
        if self.pid() is not None:
            print(f"kafka did not stop within {timeout:.0f}s; killing it (see {self.logfile})", file=sys.stderr)
            os.kill(pid, signal.SIGKILL)
            while self.pid() is not None:
                time.sleep(0.1)
        self.pidfile.unlink(missing_ok=True)

    def reset(self) -> None:
        """Stop the broker and delete its data directory: every topic, offset and changelog."""
        self.down()
        shutil.rmtree(self.home, ignore_errors=True)


def default_broker() -> LocalKafka:
    """The broker `make kafka-up` manages: $KAFKA_HOME (default .kafka/ at the project root), port
    $KAFKA_PORT (default 9092), controller port $KAFKA_CONTROLLER_PORT (default the next one)."""
    port = int(os.environ.get("KAFKA_PORT") or "9092")
    controller = os.environ.get("KAFKA_CONTROLLER_PORT")
    home = Path(os.environ.get("KAFKA_HOME") or ROOT / ".kafka").resolve()
    return LocalKafka(home, port=port, controller_port=int(controller) if controller else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the project's local single-node Kafka (KRaft).")
    parser.add_argument("command", choices=["up", "down", "reset", "status", "fetch"])
    args = parser.parse_args(argv)
    broker = default_broker()
    try:
        extra_jvm_options()  # bad options: say so before anything starts
        if args.command == "fetch":
            print(fetch_jars())
        elif args.command == "up":
            broker.up()
            print(f"kafka up on {broker.bootstrap} (pid {broker.pid()}, log {broker.logfile})")
        elif args.command == "down":
            running = broker.pid() is not None
            broker.down()
            print(f"kafka {'stopped' if running else 'not running'}; data kept in {broker.home} "
                  "('make kafka-reset' deletes it)")
        elif args.command == "reset":
            broker.reset()
            print(f"kafka stopped and its data deleted ({broker.home})")
        else:
            pid = broker.pid()
            print(f"kafka running on {broker.bootstrap} (pid {pid})" if pid else "kafka not running")
            return 0 if pid else 1
    except BadOptions as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KafkaError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
