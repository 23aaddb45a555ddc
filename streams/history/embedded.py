"""The embedded PostgreSQL of `make run` and `make test`: pgserver (PostgreSQL 16 in a pip package).

`MESSENGER_STREAMS_HISTORY_DSN=embedded` (or `embedded:/some/dir`) makes a process start, or join,
the server whose data lives in that directory (default `<datadir>/postgres`). pgserver counts the
processes using it and stops the server when the last one exits. It listens on a Unix socket only.
pgserver is a development dependency: production sets a real DSN and does not need it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # platformdirs warns at import when XDG_RUNTIME_DIR is unset
    try:  # an optional dependency (installed by `make install`), not a way around an import cycle
        import pgserver.postgres_server as pgserver
    except ImportError:  # pragma: no cover - production installs without the dev extras
        pgserver = None  # type: ignore[assignment]  # the module is absent: start_embedded says so

log = logging.getLogger("messenger_streams.history")

EMBEDDED = "embedded"


class EmbeddedError(RuntimeError):
    """The embedded server cannot be started (pgserver missing, data directory unusable)."""


def is_embedded(dsn: str) -> bool:
    """True for the DSN values that ask for the embedded server."""
    return dsn == EMBEDDED or dsn.startswith(EMBEDDED + ":")


def embedded_dir(dsn: str, datadir: str) -> Path:
    """The data directory an `embedded[:dir]` DSN names."""
    rest = dsn[len(EMBEDDED) + 1 :] if dsn.startswith(EMBEDDED + ":") else ""
    return Path(rest) if rest else Path(datadir) / "postgres"


def start_embedded(pgdata: Path, *, delete_on_exit: bool = False) -> str:
    """Start (or join) the embedded server in `pgdata`; returns its connection URI."""
    if pgserver is None:
        raise EmbeddedError("the embedded PostgreSQL needs the pgserver package (make install); "
                            "or set MESSENGER_STREAMS_HISTORY_DSN to a PostgreSQL URI")
    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")  # platformdirs warns when XDG_RUNTIME_DIR is unset
            server = pgserver.get_server(pgdata.resolve(), cleanup_mode="delete" if delete_on_exit else "stop")
    except (OSError, RuntimeError, ValueError) as exc:
        raise EmbeddedError(f"cannot start the embedded PostgreSQL in {pgdata}: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - pgserver raises subprocess errors and AssertionError too
        raise EmbeddedError(f"cannot start the embedded PostgreSQL in {pgdata}: {type(exc).__name__}: {exc}") from None
    uri = str(server.get_uri())
    log.info("embedded PostgreSQL at %s", uri)
    return uri


def resolve_dsn(dsn: str, datadir: str) -> str:
    """A connectable DSN: the embedded server's URI for `embedded[:dir]`, else `dsn` itself."""
    return start_embedded(embedded_dir(dsn, datadir)) if is_embedded(dsn) else dsn


def stop_embedded(pgdata: Path) -> None:
    """Stop this process's hold on the embedded server now (the last holder stops the server)."""
    if pgserver is None:
        return
    server = pgserver.PostgresServer._instances.get(pgdata.resolve())  # noqa: SLF001 - no public lookup
    if server is not None:
        server.cleanup()
