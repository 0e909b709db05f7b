"""Sharded consumers that drain the buffer pool into partitioned PostgreSQL, exactly once."""
