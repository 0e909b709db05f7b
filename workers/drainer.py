"""The drain of one worker process: its share of the lanes, drained concurrently.

Every worker process renews its membership (buffer.lanes) every half second and deals the lanes
over the live workers (sharding.lanes): each runs a ``LaneDrain`` (workers.lane) for every lane
dealt to it, and lets go of the lanes dealt to others, after the batch in flight. A worker that
joins or leaves moves lanes within a second; a killed one's lanes move once its membership
lapses (``LEASE_S``, 2 s). Lanes of one process proceed concurrently, each on its own Postgres
connection; workers of many hosts share the lanes the same way.

The drainer also reads the operators' controls (pause, rate) for its lanes, and the owner of
lane 0 records the buffer's per-second history.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from redis.exceptions import RedisError

from ordergate.buffer import history
from ordergate.buffer.connection import cancel_and_wait
from ordergate.buffer.consumer import outstanding
from ordergate.buffer.control import read_control
from ordergate.buffer.lanes import BEAT_S, Membership
from ordergate.sharding.lanes import lanes_of
from ordergate.workers.config import WorkerConfig
from ordergate.workers.lane import DrainStats, LaneDrain, Shared

log = logging.getLogger(__name__)

__all__ = ["DrainStats", "Drainer"]


class Drainer:
    """One worker process's part in the drain."""

    HISTORY_S = 1.0

    def __init__(self, config: WorkerConfig, redis: Any, keys: Any, name: str) -> None:
        self.config = config
        self.redis = redis
        self.keys = keys
        self.name = name
        self.stats = DrainStats(name)
        self.membership = Membership(redis, keys, name)
        self._lanes: dict[int, tuple[LaneDrain, asyncio.Task[None]]] = {}
        self._control: Any = None
        self._history_at = 0.0

    async def run(self, stop: asyncio.Event, *, burst: bool = False) -> DrainStats:
        """Drain until ``stop`` is set; in burst mode, until the buffer is empty and settled."""
        shared = Shared(
            self.config, self.redis, self.keys, self.name, self.stats, stop, burst=burst
        )
        try:
            # Join first, deal lanes one beat later: workers started together then see each
            # other before any takes a lane, instead of moving half of them a beat later.
            try:
                await self.membership.beat()
            except (RedisError, OSError):
                log.debug("cannot join the membership yet", exc_info=True)
            try:
                await asyncio.wait_for(stop.wait(), BEAT_S)
            except TimeoutError:
                pass
            while not stop.is_set():
                await self._beat(shared)
                if burst and await self._all_settled():
                    break
                try:
                    await asyncio.wait_for(stop.wait(), BEAT_S)
                except TimeoutError:
                    pass
        finally:
            stop.set()  # every lane finishes its batch in flight and lets go
            lanes = [task for _, task in self._lanes.values()]
            await asyncio.gather(*lanes, return_exceptions=True)
            await cancel_and_wait(lanes)
            self._lanes.clear()
            try:
                await self.membership.leave()
            except (RedisError, OSError):
                log.debug("cannot leave the membership", exc_info=True)
            self.stats.role = "stopped"
        return self.stats

    async def _beat(self, shared: Shared) -> None:
        try:
            live = await self.membership.beat()
            control = await read_control(self.redis, self.keys)
        except (RedisError, OSError) as exc:
            log.warning("%s: cannot renew its membership (%r)", self.name, exc)
            return  # the lanes carry on; their own Redis calls fail or are fenced
        shared.live = set(live)
        self._obey(shared, control)
        mine = lanes_of(self.name, self.config.shards, live)
        for shard, (lane, task) in list(self._lanes.items()):
            if task.done():
                del self._lanes[shard]
                if not task.cancelled() and task.exception() is not None:
                    log.error("lane %d failed", shard, exc_info=task.exception())
            elif shard in mine:
                lane.release.clear()  # dealt back to us before it let go: keep it
            elif not lane.release.is_set():
                log.info("%s: lane %d moves to another worker", self.name, shard)
                lane.release.set()
        for shard in mine:
            if shard not in self._lanes:
                lane = LaneDrain(shared, shard)
                self._lanes[shard] = (lane, asyncio.create_task(lane.run(), name=f"lane-{shard}"))
        self.stats.lanes = sorted(s for s, (lane, _) in self._lanes.items() if lane.owned)
        self.stats.role = "draining" if mine else "idle"
        if 0 in mine and time.monotonic() - self._history_at >= self.HISTORY_S:
            self._history_at = time.monotonic()
            try:
                await history.record(self.redis, self.keys, self.config.shards)
            except (RedisError, OSError):
                log.debug("cannot record history", exc_info=True)

    def _obey(self, shared: Shared, control: Any) -> None:
        """The operators' controls: the cap is the lower of ``drain_rate`` and theirs."""
        shared.cap = control.cap(self.config.drain_rate)
        if control.paused:
            at = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(control.at_us / 1e6))
            shared.paused = f"paused by {control.by or 'an operator'} at {at}"
        else:
            shared.paused = ""
        if control != self._control:
            self._control = control
            log.info(
                "%s: drain %s, cap %s (set by %s)",
                self.name,
                "paused" if control.paused else "running",
                f"{shared.cap:g}/s" if shared.cap else "none",
                control.by or "-",
            )

    async def _all_settled(self) -> bool:
        try:
            length = await outstanding(self.redis, self.keys, list(range(self.config.shards)))
        except (RedisError, OSError):
            return False
        return length == 0
