"""Rewrite docs/openapi.json from the gateway's types (tests/gateway/test_openapi.py checks it
matches what GET /openapi.json serves)."""

from pathlib import Path

from ordergate.gateway.openapi import encoded

path = Path(__file__).resolve().parent.parent / "docs" / "openapi.json"
path.write_bytes(encoded())
print(f"wrote {path}")
