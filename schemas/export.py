"""Export JSON Schema files for the values of the public topics: `python -m schemas.export`.

Consumers in other languages validate against schemas/json/*.schema.json; a test fails when a
file is stale, so the files always match the pydantic models.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from pydantic import BaseModel, TypeAdapter

from schemas.dlq import DeadLetter
from schemas.events import NormalizedEvent
from schemas.pages import DIRECTORY_RECORD, PageActivity

OUT = Path(__file__).parent / "json"

# file stem (the topic, by its default name) → model or TypeAdapter of the record value
EXPORTS: dict[str, type[BaseModel] | TypeAdapter[object]] = {
    "messenger.dlq": DeadLetter,
    "messenger.events": NormalizedEvent,
    "connector.pages": DIRECTORY_RECORD,  # type: ignore[dict-item]  # a TypeAdapter of the record union
    "connector.pages.activity": PageActivity,
}


def _register_optional() -> None:
    """Models added by later stages register here when their modules exist."""
    import importlib

    try:
        contract = importlib.import_module("schemas.contract")
    except ImportError:
        return
    EXPORTS.update(contract.EXPORTS)


def render() -> dict[str, str]:
    """File name → JSON text of every exported schema."""
    _register_optional()
    files = {}
    for stem, model in sorted(EXPORTS.items()):
        schema = model.model_json_schema() if isinstance(model, type) else model.json_schema()
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema", "$id": f"{stem}.schema.json", **schema}
        files[f"{stem}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    return files


def main() -> int:
    OUT.mkdir(exist_ok=True)
    files = render()
    for name, text in files.items():
        (OUT / name).write_text(text, encoding="utf-8")
    for stale in OUT.glob("*.schema.json"):
        if stale.name not in files:
            stale.unlink()
    print(f"wrote {len(files)} schemas to {OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
