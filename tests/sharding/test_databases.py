"""Shards across Postgres databases: the list's parsing, its refusals, and floor(k * n / shards)."""

from __future__ import annotations

import re

import pytest

from ordergate.errors import ConfigError
from ordergate.settings import Settings
from ordergate.sharding.databases import (
    database_of,
    describe,
    parse_database_urls,
    redacted,
    shards_on,
)

A = "postgresql://og@pg-a:5432/ordergate"
B = "postgresql://og:secret@pg-b/ordergate"


def test_shard_k_lives_on_database_floor_k_n_over_shards() -> None:
    assert [database_of(k, 2, 8) for k in range(8)] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [database_of(k, 3, 8) for k in range(8)] == [0, 0, 0, 1, 1, 1, 2, 2]
    assert [database_of(k, 1, 8) for k in range(8)] == [0] * 8
    assert shards_on(1, 2, 8) == [4, 5, 6, 7]
    assert shards_on(2, 3, 8) == [6, 7]


@pytest.mark.parametrize("shards", [1, 2, 3, 7, 8, 64, 1024])
def test_every_database_holds_one_contiguous_run_and_every_shard_one_database(
    shards: int,
) -> None:
    for n in {1, 2, 3, min(shards, 5), shards}:
        if n > shards:
            continue
        runs = [shards_on(i, n, shards) for i in range(n)]
        assert all(runs), (shards, n, runs)  # none empty
        assert [k for run in runs for k in run] == list(range(shards))  # each once, in order
        assert all(run == list(range(run[0], run[-1] + 1)) for run in runs)
        assert max(map(len, runs)) - min(map(len, runs)) <= 1  # as even as it can be


def test_the_list_is_split_on_spaces_in_order() -> None:
    assert parse_database_urls(A, 8) == (A,)
    assert parse_database_urls(f"  {A}   {B}\n", 8) == (A, B)
    multi_host = "postgresql://og@h1:5432,h2:5433/ordergate"  # libpq's failover hosts: one entry
    assert parse_database_urls(f"{multi_host} {A}", 8) == (multi_host, A)


@pytest.mark.parametrize(
    ("value", "shards", "message"),
    [
        ("   ", 8, "it is blank"),
        (f"{A} , {B}", 8, "entry 2 (',') is not a postgresql:// URL"),
        (f"{A} pg-b:5432", 8, "entry 2 ('pg-b:5432') is not a postgresql:// URL"),
        (f"{A} {A}", 8, "entries 1 and 2 name the same database"),
        # the same database spelled differently: scheme, user, default port, host's case
        (f"{A} postgres://other@PG-A/ordergate", 8, "entries 1 and 2 name the same database"),
        (f"{A} {B} postgresql://pg-c/ordergate", 2, "it lists 3 databases for 2 shards"),
    ],
)
def test_bad_lists_are_refused_with_what_is_wrong(value: str, shards: int, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_database_urls(value, shards)


def test_the_settings_refuse_a_bad_list_at_load() -> None:
    with pytest.raises(ConfigError, match="database_url: it lists 3 databases for 2 shards"):
        Settings.load({"database_url": f"{A} {B} postgresql://c/db", "shards": 2}, environ={})
    with pytest.raises(ConfigError, match="database_url: entries 1 and 2 name the same"):
        Settings.load({}, environ={"ORDERGATE_DATABASE_URL": f"{A} {A}"})
    settings = Settings.load({}, environ={"ORDERGATE_DATABASE_URL": f"{A} {B}"})
    assert settings.database_url == f"{A} {B}"  # one string, as every other setting
    assert settings.database_urls == (A, B)
    assert Settings.load({}, environ={}).database_urls == ()


def test_errors_name_a_database_by_place_and_never_print_a_password() -> None:
    assert describe(1, 2, 8) == "database 1 of 2 (lanes 4-7)"
    assert describe(0, 8, 8) == "database 0 of 8 (lane 0)"
    assert redacted(B) == "postgresql://og:***@pg-b/ordergate"
    assert redacted(A) == A
    with pytest.raises(ValueError) as refused:
        parse_database_urls(f"{B} {B}", 8)
    assert "secret" not in str(refused.value)
