"""Erasing one person: their rows in the store, then the `forget` action for the processor's state.

Shared by `messenger-streams history forget` and the worker's `POST /admin/forget`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

from streams.core import serde
from streams.history.store import HistoryStore
from streams.rules.history import forget_action

SendAction = Callable[[bytes, bytes], Awaitable[None]]  # (key, value) → written to agent.actions


async def forget_person(store: HistoryStore, send_action: SendAction, page_id: str, psid: str) -> dict[str, Any]:
    """Erase every stored row about the person, then ask the processor (through `agent.actions`) to
    erase their conversation state. Returns what was erased and the action id."""
    now_ms = int(time.time() * 1000)
    erased = await store.forget(page_id, psid, now_ms)
    action = forget_action(page_id, psid, f"forget-{uuid.uuid4().hex}", now_ms)
    await send_action(f"{page_id}:{psid}".encode(), serde.dumps(action))
    return {"page_id": page_id, "psid": psid, "erased": erased, "forget_action_id": action["action_id"],
            "forgotten_at": now_ms}
