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
from ordergate.sharding.databases import database_of, describe


@dataclass
class GatewayState:
    config: GatewayConfig
    keys: Keys
    redis: Any
    admitter: Admitter
    auth: Authenticator
    tickets: Tickets
    drain_view: Any  # gateway.queue.DrainView
    # One small asyncpg pool per database of database_urls (committed orders' statuses,
    # /readyz), each None until its database is reachable
    pg: list[Any] = field(default_factory=list)
    streams: Counter[str] = field(default_factory=Counter)  # open event streams, by ticket
    refusals: RefusalCounts = field(default_factory=RefusalCounts)  # 429s, sent each second

    def database_of(self, shard: int) -> int:
        """The index of the database holding ``shard``'s rows."""
        return database_of(shard, len(self.config.database_urls), self.config.shards)

    def describe(self, database: int) -> str:
        """How answers name a database: "Postgres" alone when there is one (no URL ever)."""
        n = len(self.config.database_urls)
        return "Postgres" if n <= 1 else f"Postgres {describe(database, n, self.config.shards)}"
