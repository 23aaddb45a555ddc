"""PersonaBook's per-persona locks stay bounded without dropping one that is held (#17)."""

from __future__ import annotations

import asyncio

from streams.core.config_rich import Personas
from streams.edges.personas import PersonaBook


async def test_locks_bounded_but_a_held_lock_is_kept() -> None:
    book = PersonaBook(Personas(max_personas=2), "127.0.0.1:1", "personas", "http://graph")
    held = book.locks["p|held"] = asyncio.Lock()
    await held.acquire()
    for i in range(5):
        book._drop_idle_locks()  # noqa: SLF001 - the bound under test
        book.locks[f"p|{i}"] = asyncio.Lock()
        assert len(book.locks) <= 2
        assert book.locks["p|held"] is held  # a creation in progress keeps its lock
    held.release()
    book._drop_idle_locks()  # noqa: SLF001
    book.locks["p|new"] = asyncio.Lock()
    assert "p|held" not in book.locks and len(book.locks) == 2
