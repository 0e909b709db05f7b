"""The last minutes of the buffer, one sample a second, for the dashboard's charts and rates.

The worker that owns lane 0 records a sample every second (one writer at a time, so samples are
evenly spaced and survive a gateway restart); readers get ingest and drain rates from the
differences of consecutive samples: ``issued`` is the admission counter, ``settled`` the count of
orders settled over all lanes, so both are exact and never go back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import msgspec

from ordergate.buffer.consumer import stream_lengths
from ordergate.buffer.keys import Keys
from ordergate.buffer.position import counters_of, queue_counters
from ordergate.buffer.storefronts import read_counts

KEEP = 900  # samples kept: 15 minutes at one a second
TOP_STOREFRONTS = 20


class Sample(msgspec.Struct, frozen=True, omit_defaults=True):
    t: float  # unix seconds
    issued: int  # queue numbers handed out so far
    settled: int  # orders committed, rejected or dead-lettered so far, over all lanes
    depth: list[int]  # per shard: entries in the stream, admitted and not yet settled
    # The storefronts holding most of the buffer (at most TOP_STOREFRONTS): id -> [admitted so
    # far, settled so far], for each one's rates.
    sf: dict[str, list[int]] = {}


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Sample)


async def take_sample(redis: Any, keys: Keys, shards: int) -> Sample:
    pipe = redis.pipeline(transaction=False)
    queue_counters(pipe, keys, shards)
    issued, settled = counters_of(await pipe.execute())
    lengths = await stream_lengths(redis, keys, list(range(shards)))
    depth = [lengths[shard] for shard in range(shards)]
    counts = (await read_counts(redis, keys, shards))[:TOP_STOREFRONTS]
    return Sample(
        time.time(),
        issued,
        settled,
        [int(d) for d in depth],
        {c.storefront_id: [c.admitted, c.settled] for c in counts},
    )


async def record(redis: Any, keys: Keys, shards: int) -> Sample:
    """Take a sample and keep it (the newest KEEP)."""
    sample = await take_sample(redis, keys, shards)
    pipe = redis.pipeline(transaction=False)
    pipe.lpush(keys.history(), _encoder.encode(sample))
    pipe.ltrim(keys.history(), 0, KEEP - 1)
    await pipe.execute()
    return sample


async def read(redis: Any, keys: Keys, seconds: float = 300) -> list[Sample]:
    """The samples of the last ``seconds``, oldest first."""
    raw = await redis.lrange(keys.history(), 0, max(0, int(seconds)))
    cutoff = time.time() - seconds
    samples = [_decoder.decode(r) for r in raw]
    return [s for s in reversed(samples) if s.t >= cutoff]


def rates(samples: Sequence[Sample], window_s: float = 10) -> tuple[float | None, float | None]:
    """(ingest, drain) in orders per second over the last ``window_s`` of ``samples`` (oldest
    first); None without two samples in the window."""
    if len(samples) < 2:
        return None, None
    last = samples[-1]
    first = next((s for s in samples if s.t >= last.t - window_s), samples[0])
    span = last.t - first.t
    if span <= 0:
        return None, None
    return (last.issued - first.issued) / span, (last.settled - first.settled) / span


def storefront_rates(
    samples: Sequence[Sample], storefront_id: str, window_s: float = 10
) -> tuple[float | None, float | None]:
    """(ingest, drain) of one storefront as ``rates`` (None while it was not among the
    storefronts sampled at both ends of the window)."""
    if len(samples) < 2:
        return None, None
    last = samples[-1]
    first = next((s for s in samples if s.t >= last.t - window_s), samples[0])
    span = last.t - first.t
    a, b = first.sf.get(storefront_id), last.sf.get(storefront_id)
    if span <= 0 or a is None or b is None:
        return None, None
    return (b[0] - a[0]) / span, (b[1] - a[1]) / span
