"""What a gateway process holds open while it runs (built in the app's lifespan)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from buffer.admission import Admitter
from buffer.keys import Keys
from gateway.auth import Authenticator
from gateway.tickets import Tickets
from ordergate.settings import Settings


@dataclass
class GatewayState:
    settings: Settings
    keys: Keys
    redis: Any
    admitter: Admitter
    auth: Authenticator
    tickets: Tickets
    drain_view: Any  # gateway.queue.DrainView
    pg: Any = None  # asyncpg pool for /readyz and old-status lookups; None until reachable
