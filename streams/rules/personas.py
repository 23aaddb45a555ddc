"""Which Messenger persona a Send API request goes out as: pure, no I/O.

With `personas.enabled`, automatic messages and the CSAT survey (`origin` system / csat) go out as
the system persona, and with `personas.agents` an agent's messages as a persona named after the
agent's nickname. The dispatcher creates each persona once per page (Personas API) and remembers
its id durably (`streams.edges.personas`); this module names them and builds their records.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from streams.core.config_rich import PERSONA_NAME_MAX, Personas


@dataclass(frozen=True, slots=True)
class PersonaSpec:
    """A persona to use: `key` names it within a page (`system`, `agent:<hash of the name>`)."""

    key: str
    name: str
    picture_url: str


def _whole_words(name: str, limit: int) -> str:
    name = " ".join(name.split())
    if len(name) <= limit:
        return name
    cut = name[:limit]
    return cut.rsplit(" ", 1)[0] if " " in cut else cut


def persona_for(origin: str | None, agent_nickname: str | None, cfg: Personas) -> PersonaSpec | None:
    """The persona of one outbound request, or None (personas off, an agent without a nickname, or
    agent personas off)."""
    if not cfg.enabled or cfg.system_picture_url is None:
        return None
    if origin in ("system", "csat"):
        return PersonaSpec("system", cfg.system_name, cfg.system_picture_url)
    if origin == "agent" and cfg.agents and cfg.agent_picture_url and agent_nickname and agent_nickname.strip():
        name = _whole_words(agent_nickname, PERSONA_NAME_MAX)
        digest = hashlib.sha1(name.encode(), usedforsecurity=False).hexdigest()[:16]
        return PersonaSpec(f"agent:{digest}", name, cfg.agent_picture_url)
    return None


def record_key(page_id: str, spec: PersonaSpec) -> str:
    """The key of a page's persona on the personas topic."""
    return f"{page_id}|{spec.key}"


def record(page_id: str, spec: PersonaSpec, persona_id: str, now: int) -> dict[str, Any]:
    """The personas topic value remembering a created (or found) persona."""
    return {"page_id": page_id, "key": spec.key, "name": spec.name, "picture_url": spec.picture_url,
            "persona_id": persona_id, "created_at": now}


def usable(value: Mapping[str, Any] | None, spec: PersonaSpec) -> str | None:
    """The persona id of a remembered record, if it still matches the spec (a changed name or picture
    in the config means a new persona)."""
    if not value or value.get("name") != spec.name or value.get("picture_url") != spec.picture_url:
        return None
    pid = value.get("persona_id")
    return pid if isinstance(pid, str) and pid else None


def find_existing(listing: Mapping[str, Any], spec: PersonaSpec) -> str | None:
    """A persona of the page's `GET /{page_id}/personas` answer with the spec's name (one created
    before a crash kept us from remembering it): reuse it rather than create a twin."""
    data = listing.get("data")
    for item in data if isinstance(data, list) else []:
        if isinstance(item, Mapping) and item.get("name") == spec.name and isinstance(item.get("id"), str | int):
            return str(item["id"])
    return None
