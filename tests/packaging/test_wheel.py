"""The wheel built from the checkout: one top-level import package, with every module and its
package data under it."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMPONENTS = ("gateway", "buffer", "workers", "sharding")


def test_the_wheel_installs_one_name_with_all_its_files(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q"]
        + ["-w", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=240,
    )
    (wheel,) = tmp_path.glob("ordergate-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    top = {name.split("/")[0] for name in names}
    assert {t for t in top if not t.endswith(".dist-info")} == {"ordergate"}, sorted(top)
    expected = {
        f"ordergate/{p.relative_to(ROOT / 'ordergate')}" for p in _files(ROOT / "ordergate")
    }
    for component in COMPONENTS:
        folder = ROOT / component
        expected |= {f"ordergate/{component}/{p.relative_to(folder)}" for p in _files(folder)}
    assert expected - names == set(), "missing from the wheel"
    assert any(n.startswith("ordergate/buffer/lua/") and n.endswith(".lua") for n in names)
    assert "ordergate/gateway/static/wait.html" in names
    assert any(n.startswith("ordergate/workers/migrations/") for n in names)


def _files(folder: Path) -> list[Path]:
    """What a package folder ships: its modules and data, not caches."""
    return [
        p
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and p.suffix not in (".pyc",)
    ]
