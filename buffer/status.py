"""An order's status as Redis knows it: from its stream entry while it is in flight, from its
status record when it is an exception (rejected, dead-lettered, re-queued).

Admission writes no status record: the order id names its stream entry (sharding.ids), which
says who it belongs to and when it was accepted. ``settle.lua`` writes a record only for the
orders Postgres will have no row of; a committed order's status comes from its row
(gateway.committed)."""

from __future__ import annotations

import datetime as dt
from typing import Any

import msgspec

from ordergate.buffer.keys import Keys
from ordergate.sharding.ids import entry_id_of

#: The status codes of an order, in the order they can happen. ``requeued``: an operator replayed
#: the dead letter (``ordergate dlq replay``); ``notified``: its webhook was delivered.
STATUS_CODES = (
    "accepted",
    "queued",
    "processing",
    "committed",
    "rejected",
    "dead_lettered",
    "requeued",
    "notified",
)
FINAL = frozenset({"committed", "rejected", "dead_lettered"})


class Change(msgspec.Struct, frozen=True):
    """One state change of an order: its status code and when it happened."""

    status: str
    at: dt.datetime


class StatusRecord(msgspec.Struct, frozen=True):
    """The status of one order as the buffer knows it."""

    order_id: str
    status: str  # queued | processing | committed | rejected | dead_lettered
    storefront_id: str
    storefront_order_id: str
    seq: int
    accepted_at: dt.datetime
    committed_at: dt.datetime | None = None
    rejected_at: dt.datetime | None = None
    reason: str | None = None
    ahead: int = 0
    timeline: list[Change] = []
    lane_seq: int = 0

    @property
    def final(self) -> bool:
        return self.status in FINAL

    @property
    def accepted_at_us(self) -> int:
        return int(self.accepted_at.timestamp() * 1e6)

    @property
    def settled_at(self) -> dt.datetime | None:
        return self.committed_at or self.rejected_at


def parse_timeline(raw: bytes | None) -> list[Change]:
    """``code@us,code@us,...`` as written by the Lua scripts."""
    changes: list[Change] = []
    for item in (raw or b"").decode().split(","):
        code, _, us = item.partition("@")
        if code and us.isdigit():
            changes.append(Change(code, dt.datetime.fromtimestamp(int(us) / 1e6, tz=dt.UTC)))
    return changes


def _time(us: bytes | None) -> dt.datetime | None:
    return dt.datetime.fromtimestamp(int(us) / 1e6, tz=dt.UTC) if us else None


async def read_status(
    redis: Any, keys: Keys, shard: int, order_id: str, storefront: str = ""
) -> StatusRecord | None:
    """The order's status from Redis, or None if Redis has neither its record nor its entry
    (unknown, expired, or committed: then Postgres has it). Its entry is in its storefront's
    sub-lane (or, admitted before sub-lanes, in the lane's base stream)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hgetall(keys.status(shard, order_id))
    entry_id = entry_id_of(order_id)
    pipe.xrange(keys.stream(shard), entry_id, entry_id)
    if storefront:
        pipe.xrange(keys.sublane(shard, storefront), entry_id, entry_id)
    raw, *found = await pipe.execute()
    if raw and b"status" in raw:
        return _from_record(order_id, raw)
    for entries in found:
        if entries:
            fields = entries[0][1]
            if fields.get(b"oid", b"").decode() == order_id:
                return _from_entry(order_id, fields)
    return None


def _from_record(order_id: str, raw: dict[bytes, bytes]) -> StatusRecord:
    return StatusRecord(
        order_id=order_id,
        status=raw[b"status"].decode(),
        storefront_id=raw.get(b"sf", b"").decode(),
        storefront_order_id=raw.get(b"sfo", b"").decode(),
        seq=int(raw.get(b"seq", 0)),
        accepted_at=_time(raw.get(b"at")) or dt.datetime.fromtimestamp(0, tz=dt.UTC),
        committed_at=_time(raw.get(b"committed_at")),
        rejected_at=_time(raw.get(b"rejected_at")),
        reason=raw[b"reason"].decode() if raw.get(b"reason") else None,
        ahead=int(raw.get(b"a0", 0)),
        timeline=parse_timeline(raw.get(b"tl")),
        lane_seq=int(raw.get(b"ls", 0)),
    )


def _from_entry(order_id: str, fields: dict[bytes, bytes]) -> StatusRecord:
    accepted = _time(fields.get(b"at")) or dt.datetime.fromtimestamp(0, tz=dt.UTC)
    return StatusRecord(
        order_id=order_id,
        status="queued",  # the caller knows from its lane's state whether it is processing
        storefront_id=fields.get(b"sf", b"").decode(),
        storefront_order_id=fields.get(b"sfo", b"").decode(),
        seq=int(fields.get(b"seq", 0)),
        accepted_at=accepted,
        ahead=int(fields.get(b"a0", 0)),
        timeline=[Change("accepted", accepted)],
        lane_seq=int(fields.get(b"ls", 0)),
    )
