"""The stream entry format: the one contract between the gateway and the workers.

An entry is a flat field map, readable with ``XRANGE`` in any Redis client:

=========  ====================================================================
``v``      format version, ``1``
``oid``    order id (``ord_<shard>_<ms><seq><nonce>``), minted by ``admit.lua``; the entry's
           own id is ``<ms>-<seq>`` (sharding.ids.entry_id_of)
``sf``     storefront id (from the API key, never from the body)
``sfo``    the storefront's own order id
``seq``    the order's queue number: one counter across all shards, assigned by Redis
``at``     accepted_at, microseconds since the epoch, stamped by the gateway
``ls``     its number inside its lane (buffer.position)
``a0``     orders ahead of it at admission
``r``      the row's columns the body would give, ``\x1f``-separated: customer id, customer
           email (empty when none), currency, total_minor, item count (``row_summary``), so
           the worker does not decode each body; entries without it are decoded
``body``   the order as canonical JSON (msgspec encoding of the validated order)
``rq``     ``1`` on an entry an operator re-queued from the dead letters (buffer.deadletters)
=========  ====================================================================

``seq``, ``ls``, ``a0`` and the order id are written by the admission script; the gateway never
chooses them.
"""

from __future__ import annotations

import datetime as dt

import msgspec

from ordergate.buffer.errors import MalformedMessage
from ordergate.buffer.order import ORDER_DECODER, Order

VERSION = b"1"
SEP = b"\x1f"  # no id, email or currency may hold a control character (buffer.order)


class OrderMessage(msgspec.Struct, frozen=True):
    """One order as the workers see it."""

    shard: int
    entry_id: str
    order_id: str
    storefront_id: str
    storefront_order_id: str
    seq: int
    accepted_at_us: int
    body: bytes
    requeued: bool = False
    lane_seq: int = 0
    ahead: int = 0
    row: bytes = b""  # the ``r`` field
    sublane: str = ""  # the sub-lane it was read from: its storefront ('' the base stream)

    def columns(self) -> tuple[str, str | None, str, int, int]:
        """(customer id, email, currency, total_minor, item count): from ``r``, or from the
        body where the entry has none (raises ValueError or a msgspec error if neither
        reads)."""
        if self.row:
            customer, email, currency, total, items = self.row.decode().split("\x1f")
            return customer, email or None, currency, int(total), int(items)
        order = ORDER_DECODER.decode(self.body)
        return (
            order.customer.id,
            order.customer.email,
            order.currency,
            order.total_minor,
            len(order.items),
        )

    @property
    def accepted_at(self) -> dt.datetime:
        return dt.datetime.fromtimestamp(self.accepted_at_us / 1e6, tz=dt.UTC)


def row_summary(order: Order) -> bytes:
    """The ``r`` field of an order's entry."""
    return SEP.join(
        (
            order.customer.id.encode(),
            (order.customer.email or "").encode(),
            order.currency.encode(),
            b"%d" % order.total_minor,
            b"%d" % len(order.items),
        )
    )


def admission_args(
    nonce: str,
    storefront_id: str,
    storefront_order_id: str,
    accepted_at_us: int,
    fingerprint: bytes,
    body: bytes,
    row: bytes,
) -> tuple[str | bytes | int, ...]:
    """The per-order arguments of the admission script, in the order ``admit.lua`` reads them;
    ``nonce`` is the random tail of the order id it mints (sharding.ids), ``row`` the entry's
    ``r`` (``row_summary``)."""
    return (nonce, storefront_id, storefront_order_id, accepted_at_us, fingerprint, row, body)


def decode_entry(
    shard: int, entry_id: bytes | str, fields: dict[bytes, bytes], sublane: str = ""
) -> OrderMessage:
    """Decode one stream entry of the sub-lane ``sublane`` (its storefront; '' the lane's base
    stream); raises MalformedMessage for anything off-contract."""
    eid = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
    try:
        if fields.get(b"v") != VERSION:
            raise MalformedMessage(f"entry {eid}: unknown format version {fields.get(b'v')!r}")
        return OrderMessage(
            shard=shard,
            entry_id=eid,
            order_id=fields[b"oid"].decode(),
            storefront_id=fields[b"sf"].decode(),
            storefront_order_id=fields[b"sfo"].decode(),
            seq=int(fields[b"seq"]),
            accepted_at_us=int(fields[b"at"]),
            body=fields[b"body"],
            requeued=fields.get(b"rq") == b"1",
            lane_seq=int(fields.get(b"ls", 0)),
            ahead=int(fields.get(b"a0", 0)),
            row=fields.get(b"r", b""),
            sublane=sublane,
        )
    except KeyError as exc:
        raise MalformedMessage(f"entry {eid}: missing field {exc.args[0]!r}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise MalformedMessage(f"entry {eid}: {exc}") from None
