"""Which Postgres database holds which shard (分库): a pure function of the list and the count.

``database_url`` may list several URLs, separated by spaces. The shards are split over them in
contiguous runs, shard k on database ``floor(k * n / shards)`` of n: with 8 shards and 2
databases, shards 0-3 on the first and 4-7 on the second. Every database holds at least one
shard (a list longer than the shard count is refused), and a shard's partition, its lane's
lock and its rows live on its database alone, so one database down stalls only its lanes.
The order of the list is the deployment's: ``migrate`` records each database's place in it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

SCHEMES = ("postgresql", "postgres")


def parse_database_urls(value: str, shards: int) -> tuple[str, ...]:
    """The URLs of a ``database_url`` setting, in order; ValueError naming what is wrong (a
    blank value, an entry that is not a postgresql:// URL, the same database twice, more
    databases than shards)."""
    urls = tuple(value.split())
    if not urls:
        raise ValueError("it is blank; give one PostgreSQL URL, or several separated by spaces")
    seen: dict[tuple[str, str], int] = {}
    for i, url in enumerate(urls):
        parts = urlsplit(url)
        if parts.scheme not in SCHEMES or not parts.netloc:
            raise ValueError(
                f"entry {i + 1} ({redacted(url)!r}) is not a postgresql:// URL; separate"
                " the URLs with spaces"
            )
        where = _identity(url)
        if where in seen:
            raise ValueError(
                f"entries {seen[where] + 1} and {i + 1} name the same database"
                f" ({redacted(url)}): each shard must live in one database"
            )
        seen[where] = i
    if len(urls) > shards:
        raise ValueError(
            f"it lists {len(urls)} databases for {shards} shards: each database holds at least"
            " one shard, so list at most as many databases as there are shards"
        )
    return urls


def database_of(shard: int, databases: int, shards: int) -> int:
    """The index of the database that holds ``shard``: ``floor(shard * databases / shards)``."""
    return shard * databases // shards


def shards_on(database: int, databases: int, shards: int) -> list[int]:
    """The shards database ``database`` of ``databases`` holds: one contiguous run."""
    return [k for k in range(shards) if database_of(k, databases, shards) == database]


def describe(database: int, databases: int, shards: int) -> str:
    """``database 1 of 2 (lanes 4-7)``: how logs, errors and /readyz name a database without
    its URL (which may hold a password and a host name)."""
    lanes = shards_on(database, databases, shards)
    run = f"lane {lanes[0]}" if len(lanes) == 1 else f"lanes {lanes[0]}-{lanes[-1]}"
    return f"database {database} of {databases} ({run})"


def redacted(url: str) -> str:
    """``url`` as it may be printed: its password replaced by ***."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username or ''}:***@{host}"))


def _identity(url: str) -> tuple[str, str]:
    """What makes two URLs the same database for the duplicate check: the hosts and ports, and
    the database name (user, password, options and the default port's spelling do not count)."""
    parts = urlsplit(url)
    hosts = []
    for host in parts.netloc.rpartition("@")[2].lower().split(","):
        hosts.append(host if host.rpartition("]")[2].count(":") else f"{host}:5432")
    return ",".join(hosts), parts.path.lstrip("/")
