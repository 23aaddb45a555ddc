"""`TableStore` writes what faust's recovery reads back: the changelog key with the table's key
serializer, the value's JSON bytes as is, the same bytes in the local store (parsed on read)."""

from __future__ import annotations

import asyncio
from typing import Any

import faust
import orjson
from faust.serializers import codecs

from streams.stages.runtime import TableStore


class CapturingProducer:
    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes | None, bytes | None, int | None]] = []

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: Any, headers: Any) -> asyncio.Future[Any]:
        self.sent.append((topic, key, value, partition))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        return fut


async def test_changelog_records_decode_as_recovery_decodes_them() -> None:
    app = faust.App("table-store-test", key_serializer="raw", value_serializer="raw", web_enabled=False)
    table = app.Table("conversations", default=None, partitions=4, value_type=bytes)
    producer = CapturingProducer()
    store = TableStore(table, producer)
    value = {"v": 2, "s": {"conv": None, "name": "Zoë"}, "g": {"a/1": 7}}
    data = orjson.dumps(value)
    table.data["\x00part:3"] = b"{}"
    store.write("page:psid-é", data, 3, None)
    await store.send("page:psid-é", data, 3)
    store.write("\x00part:3", None, 3, None)
    await store.send("\x00part:3", None, 3)
    (topic, key, raw, partition), (_, meta_key, tombstone, _) = producer.sent
    assert topic == "table-store-test-conversations-changelog" and partition == 3
    # recovery: key and value decoded with the table's own serializers
    assert codecs.loads(table.key_serializer, key) == "page:psid-é"
    assert codecs.loads(table.key_serializer, meta_key) == "\x00part:3"
    assert codecs.loads(table.value_serializer, raw) == data and tombstone is None
    # the local store holds the bytes; reads give the value back
    assert table.data["page:psid-é"] == data
    assert store.get("page:psid-é") == value
    assert store.get("\x00part:3") is None and "\x00part:3" not in table.data
