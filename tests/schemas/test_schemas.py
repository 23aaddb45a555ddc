"""The exported JSON Schema files match the pydantic models (run `make schemas` when this fails)."""

from __future__ import annotations

from schemas.export import OUT, render


def test_exported_schemas_are_current() -> None:
    files = render()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in OUT.glob("*.schema.json")}
    assert set(on_disk) == set(files), "schema files added or removed: run `make schemas`"
    for name, text in files.items():
        assert on_disk[name] == text, f"{name} is stale: run `make schemas`"
