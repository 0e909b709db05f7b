"""The operators' live dashboard: ``GET /dashboard`` (the page) and ``GET /v1/ops/dashboard``
(what it polls every second, usable by scripts too).

The page is one static file (``static/dashboard.html``, inline CSS and JS, canvas charts, no
library or CDN) read once at import. It holds no data, so it is served without a token; the
script reads the admin token from the URL fragment (``#token=...``, never sent to a server or a
log) or a form, and sends it with each poll. The Content-Security-Policy allows exactly the
page's own inline script and style by their sha256 hashes, fetches to its own origin only, and
no framing."""

from __future__ import annotations

import time
from typing import Any

import msgspec
from redis.exceptions import RedisError
from starlette.requests import Request
from starlette.responses import Response

from ordergate.buffer import history
from ordergate.buffer.overview import read_overview
from ordergate.gateway import metrics
from ordergate.gateway.errors import ServiceUnavailable
from ordergate.gateway.ops import require_admin
from ordergate.gateway.pages import StaticPage

PAGE = StaticPage("dashboard.html", frame_ancestors="'none'")
HISTORY_S = 300  # what the charts show
RATE_WINDOW_S = 10  # what the rate figures average over


class Rates(msgspec.Struct, frozen=True):
    """Orders per second over the last RATE_WINDOW_S of samples (None: fewer than two)."""

    ingest: float | None
    drain: float | None


class Dashboard(msgspec.Struct, frozen=True):
    at: float
    overview: Any  # buffer.overview.Overview, encoded as it is (its fields flow through)
    history: list[history.Sample]  # oldest first, one a second while a drainer leads
    rates: Rates
    # cumulative admission-latency buckets over all gateway processes: (upper bound in s,
    # count), the last one +Inf (encoded as null)
    admission_buckets: list[tuple[float, int]]


_encoder = msgspec.json.Encoder()


async def dashboard_page(request: Request) -> Response:
    """The dashboard page: no data in it, so no token needed to load it."""
    return PAGE.response(request)


async def dashboard_data(request: Request) -> Response:
    """GET /v1/ops/dashboard: the overview, the last minutes of samples, rates and buckets."""
    state = require_admin(request)
    try:
        overview = await read_overview(
            state.redis, state.keys, state.config.shards, state.config.drain_stale_s
        )
        samples = await history.read(state.redis, state.keys, HISTORY_S)
    except (RedisError, OSError) as exc:
        detail = f"Redis unavailable: {exc}"
        raise ServiceUnavailable(detail, headers={"Retry-After": "1"}) from None
    ingest, drain = history.rates(samples, RATE_WINDOW_S)
    body = Dashboard(
        at=time.time(),
        overview=overview,
        history=[msgspec.structs.replace(s, sf={}) for s in samples],  # the overview has them
        rates=Rates(_round(ingest), _round(drain)),
        admission_buckets=metrics.admission_buckets(state.config.metrics_dir),
    )
    return Response(
        _encoder.encode(body),
        media_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _round(rate: float | None) -> float | None:
    return None if rate is None else round(rate, 2)
