"""What a gateway process holds open while it runs (built in the app's lifespan)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from ordergate.buffer.admission import Admitter
from ordergate.buffer.keys import Keys
from ordergate.buffer.storefronts import RefusalCounts
from ordergate.gateway.auth import Authenticator
from ordergate.gateway.config import GatewayConfig
from ordergate.gateway.tickets import Tickets


@dataclass
class GatewayState:
    config: GatewayConfig
    keys: Keys
    redis: Any
    admitter: Admitter
    auth: Authenticator
    tickets: Tickets
    drain_view: Any  # gateway.queue.DrainView
    pg: Any = None  # asyncpg pool for /readyz and old-status lookups; None until reachable
    streams: Counter[str] = field(default_factory=Counter)  # open event streams, by ticket
    refusals: RefusalCounts = field(default_factory=RefusalCounts)  # 429s, sent each second
