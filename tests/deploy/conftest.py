"""The deployment files need no servers: no embedded Valkey or PostgreSQL for these tests."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def clean() -> None:
    """Replaces tests/conftest.py's `clean`, which starts the session's servers."""
