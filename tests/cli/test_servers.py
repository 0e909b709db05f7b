"""The embedded servers are ready when ``start`` returns, not merely listening."""

from __future__ import annotations

from pathlib import Path

import redis

from ordergate.servers import EmbeddedValkey


def test_valkey_restarted_on_a_large_data_set_answers_as_soon_as_start_returns(
    tmp_path: Path,
) -> None:
    """Injects: a restart on a ~40 MB append-only file, which Valkey loads after opening its
    port (commands meanwhile get LOADING). Audits: the first command after start() succeeds."""
    server = EmbeddedValkey(tmp_path)
    url = server.start()
    client = redis.Redis.from_url(url)
    pipe = client.pipeline(transaction=False)
    value = b"x" * 100
    for i in range(300_000):
        pipe.set(f"k{i}", value)
        if i % 10_000 == 9_999:
            pipe.execute()
    pipe.execute()
    client.close()
    server.stop()
    server.start()
    try:
        client = redis.Redis.from_url(url)
        assert client.dbsize() == 300_000  # BusyLoadingError here before the fix
        client.close()
    finally:
        server.stop()
