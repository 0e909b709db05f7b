"""Every Redis key name of ordergate, in one place.

Keys of a shard carry the shard's hash tag (``og:{3}:stream``). Each shard is a lane: its
stream, its lane hash and its dead letters are taken and settled together by the lane's one
owner.

On one primary, admission numbers orders with one counter over all lanes (one script call per
gateway batch, over the streams of several shards) and settling adds to one settled count and
one notification stream: those scripts also touch keys of no shard. On a Redis/Valkey Cluster
every script must touch one slot, so what those scripts share becomes per lane: ``at(shard)``
names, under the lane's hash tag, its own admission counter, settled count, storefront counts
and notification stream, and its copies of the storefronts' limits, the set of those with keys
and the webhook marks (written to every lane by their owners). Readers add the lanes up. The
keys of no shard then carry one hash tag of their own (``og:{og}:apikeys``), so the few
transactions over them still run on one node.
"""

from __future__ import annotations

import base64
import hashlib
import re

# Each stream is created with this group (XGROUP CREATE MKSTREAM); nothing reads through it.
GROUP = "workers"
STOREFRONT_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")  # fullmatch: ids name keys


class Keys:
    """Key names under one prefix (``og`` unless configured)."""

    __slots__ = ("_g", "cluster", "prefix")

    def __init__(self, prefix: str = "og", cluster: bool = False) -> None:
        self.prefix = prefix
        self.cluster = cluster
        self._g = f"{prefix}:{{{prefix}}}" if cluster else prefix  # the keys of no shard

    def at(self, shard: int) -> Keys:
        """The keys the scripts of lane ``shard`` use for what is global on one primary (the
        counters, the storefronts' hashes, the notification stream): the same keys on one
        primary; on a cluster, the lane's own, under its hash tag."""
        if not self.cluster:
            return self
        scoped = Keys(self.prefix)
        scoped.cluster = True
        scoped._g = self.tag(shard)
        return scoped

    def every_lane(self, shards: int) -> list[Keys]:
        """Where a copy kept for the lanes' scripts is written: once on one primary, once per
        lane on a cluster (ValueError without the deployment's shard count: a copy written to
        no lane would be silently missing)."""
        if not self.cluster:
            return [self]
        if shards <= 0:
            raise ValueError("on a cluster, copies are kept per lane: give the shard count")
        return [self.at(shard) for shard in range(shards)]

    def tag(self, shard: int) -> str:
        return f"{self.prefix}:{{{shard}}}"

    def stream(self, shard: int) -> str:
        """The shard's buffer stream: orders accepted and not yet committed."""
        return f"{self.tag(shard)}:stream"

    def sublane(self, shard: int, storefront_id: str) -> str:
        """One storefront's orders in the lane, first in first out (a stream, made by its first
        order); the lane's owner drains its sub-lanes by weight (buffer.fairness). The lane's
        base stream (``stream``) is the sub-lane of entries that name no storefront."""
        if not storefront_id:
            return self.stream(shard)
        return f"{self.tag(shard)}:stream:{storefront_id}"

    def idem(self, shard: int, storefront_id: str, storefront_order_id: str) -> str:
        """Idempotency record (buffer.idempotency) of (storefront, storefront_order_id): named by
        a 96-bit hash of the two, so its length does not grow with theirs."""
        digest = hashlib.blake2b(
            f"{storefront_id}\n{storefront_order_id}".encode(), digest_size=12
        ).digest()
        return f"{self.tag(shard)}:idk:{base64.urlsafe_b64encode(digest).decode()}"

    def status(self, shard: int, order_id: str) -> str:
        """The order's status record (hash)."""
        return f"{self.tag(shard)}:order:{order_id}"

    def lane(self, shard: int) -> str:
        """Hash: the lane's counters and owner (buffer.lanes): ``n`` orders admitted into it,
        ``s`` settled, ``last`` the queue number of its newest order, ``w`` its watermark,
        ``d`` the newest queue number taken (``dl`` its lane number, ``c`` its entry id: the
        lane's cursor), ``epoch``/``owner`` the fence (``prev`` the owner before), the state its
        owner reports (``state``, ``reason``, ``at``, ``rate``, ``cap``), and ``seen``, written by
        admit.lua when it gives a receipt again and writes nothing else (so the batch's barrier
        covers the order's own write)."""
        return f"{self.tag(shard)}:lane"

    def deliveries(self, shard: int) -> str:
        """Hash: entry id -> how many owners took it and were lost before settling it, written
        on takeover only (``claim.lua``); an entry at ``max_deliveries`` is dead-lettered."""
        return f"{self.tag(shard)}:deliveries"

    def deadletters(self, shard: int) -> str:
        """The shard's dead-letter stream."""
        return f"{self.tag(shard)}:dlq"

    # Keys that belong to no shard.
    def deployment(self) -> str:
        """Hash: the shard count every process of this key prefix must share (buffer.streams)."""
        return f"{self._g}:deployment"

    def seq(self) -> str:
        """The admission counter: every admitted order's queue number (1, 2, 3, ...)."""
        return f"{self._g}:seq"

    def drain(self) -> str:
        """Hash: ``s``, the orders settled over all lanes (buffer.position)."""
        return f"{self._g}:drain"

    def drain_changes(self) -> str:
        """Pub/sub channel: the drain state changed (a batch taken or settled, a heartbeat)."""
        return f"{self._g}:drain:changed"

    def ticket_secret(self) -> str:
        """The key that signs queue tickets, made once by the first gateway."""
        return f"{self._g}:ticket-secret"

    def api_keys(self) -> str:
        """Hash: sha256(api key) -> storefront id."""
        return f"{self._g}:apikeys"

    # Notifications (webhooks): settle.lua queues an event for every settled order whose
    # storefront has a webhook; the notifier delivers them (workers.notifier).
    def webhook(self, storefront_id: str) -> str:
        """Hash: the storefront's webhook url and signing secret (its presence turns events on)."""
        return f"{self._g}:webhook:{storefront_id}"

    def webhooks(self) -> str:
        """Set: storefront ids with a webhook (for listing)."""
        return f"{self._g}:webhooks"

    def notify(self) -> str:
        """Stream: notification events not yet delivered nor deferred."""
        return f"{self._g}:notify"

    def notify_deferred(self, storefront_id: str) -> str:
        """Stream: one destination's deferred events, replayed in order when it recovers."""
        return f"{self._g}:notify:deferred:{storefront_id}"

    def notify_lanes(self) -> str:
        """Set: storefront ids that have (or had) a deferred stream; read instead of a SCAN."""
        return f"{self._g}:notify:lanes"

    def notify_retries(self) -> str:
        """Hash: event id -> failed attempts and the last error of a deferred event."""
        return f"{self._g}:notify:retries"

    def notify_dead(self) -> str:
        """Stream: events that kept failing for ``notify_give_up_s``, with their last error."""
        return f"{self._g}:notify:dead"

    def notify_leader(self) -> str:
        """The notifier's lease: one process delivers, so each destination's order holds."""
        return f"{self._g}:notify:leader"

    def notify_state(self) -> str:
        """JSON the leading notifier refreshes every second: its breakers and lanes."""
        return f"{self._g}:notify:state"

    # Storefronts (buffer.storefronts): hashes keyed by storefront id, so each holds one field
    # per storefront that ever had an API key, a limit or an order (bounded by the API keys).
    def storefront_limits(self) -> str:
        """Hash: storefront id -> its own limit, ``"<rate> <burst> <weight>"`` (no field: the
        defaults of the settings)."""
        return f"{self._g}:sf:limits"

    def storefront_tat(self) -> str:
        """Hash: storefront id -> its rate limit's theoretical arrival time (GCRA, unix us):
        the bucket is full again once the clock passes it."""
        return f"{self._g}:sf:tat"

    def storefront_buffered(self) -> str:
        """Hash: storefront id -> its orders in the buffer, admitted and not yet settled (a
        field only while it has some: HLEN counts the storefronts holding the buffer)."""
        return f"{self._g}:sf:buffered"

    def storefront_settled(self) -> str:
        """Hash: storefront id -> its orders settled so far (committed, rejected or
        dead-lettered; never goes back). Settled plus buffered: its orders admitted so far (a
        replayed dead letter counting again)."""
        return f"{self._g}:sf:settled"

    def storefront_known(self) -> str:
        """Set: storefront ids with an API key (gateway.auth keeps it); with one alone, the
        buffer keeps no reserve for others."""
        return f"{self._g}:sf:known"

    def storefront_refused(self) -> str:
        """Hash: ``<storefront id>:<reason>`` -> orders refused with 429 (reason: rate, share,
        full), added up by the gateways every second."""
        return f"{self._g}:sf:refused"

    def members(self) -> str:
        """Sorted set: worker processes -> when their membership lapses (unix ms); the lanes
        are split among the live ones (buffer.lanes)."""
        return f"{self._g}:workers"

    def worker_health(self, consumer: str) -> str:
        """A worker's heartbeat, expiring when the worker stops beating."""
        return f"{self._g}:worker:{consumer}"

    def history(self) -> str:
        """List of per-second samples of the buffer (newest first), for the dashboard."""
        return f"{self._g}:history"

    def drain_control(self) -> str:
        """Hash of the operators' drain controls (paused, rate), read by every worker."""
        return f"{self._g}:drain:control"
