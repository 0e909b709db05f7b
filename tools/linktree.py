"""Build ``build/linktree/ordergate``: the installed package's layout as symlinks into the tree.

The components live at the top of the repository (gateway/, buffer/, workers/, sharding/) and
install as ``ordergate.<name>`` through setuptools' package-dir; Python finds them through the
editable install's import hook, but static tools (mypy, import-linter) walk directories. They
read this tree instead: ``python tools/linktree.py`` prints its parent, for MYPYPATH/PYTHONPATH.
"""

from __future__ import annotations

import shutil
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(out: Path) -> Path:
    mapping: dict[str, str] = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"][
        "setuptools"
    ]["package-dir"]
    if out.exists():
        shutil.rmtree(out)
    for package, folder in mapping.items():
        target = out.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / folder).iterdir()):
            if source.name == "__init__.py":  # a copy: tools that resolve a package's
                shutil.copyfile(source, target / source.name)  # path must stay in here
            elif source.suffix == ".py":
                (target / source.name).symlink_to(source)
    return out


if __name__ == "__main__":
    print(build(ROOT / "build" / "linktree"))
    sys.exit(0)
