"""Where the time goes: py-spy's collapsed stacks (``-f raw``) summed by layer and by function.

Each sample is charged to the layer of its innermost frame that belongs to a known layer, so a
``hashlib`` call inside ``create_order`` counts as the gateway's, and uvicorn writing a response
that Starlette passed on counts as uvicorn's. py-spy samples only while the process runs Python
or native code (not while it waits in epoll), so the shares are of the busy time.

    python -m loadtests.bench_profile DIR/gateway.txt [--top 25]
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

# (layer, substrings of a frame's "function (file:line)"), innermost match wins; first rule first.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("redis-py: pipeline packing, socket, replies", ("redis/", "hiredis")),
    ("admission batching (buffer/admission.py)", ("buffer/admission.py",)),
    ("other buffer/ (scripts, keys, position)", ("buffer/",)),
    ("order id, shard (sharding/)", ("sharding/",)),
    ("validation (gateway/validation.py)", ("gateway/validation.py",)),
    ("API key lookup (gateway/auth.py)", ("gateway/auth.py",)),
    ("ticket (gateway/tickets.py)", ("gateway/tickets.py",)),
    (
        "request body (_receive_body)",
        ("_receive_body", "Request.stream", "RequestResponseCycle.receive"),
    ),
    ("create_order itself (receipt, hashing, checks)", ("gateway/orders.py",)),
    ("baseline handler (decode, 202)", ("loadtests/bench_apps.py",)),
    ("drain: take, settle (buffer/consumer.py)", ("buffer/consumer.py",)),
    ("drain: Postgres write (workers/persist.py)", ("workers/persist.py", "asyncpg/")),
    ("drain: loop (workers/)", ("workers/",)),
    ("Starlette: routing, middleware, Response", ("starlette/",)),
    ("uvicorn + httptools: HTTP protocol", ("uvicorn/", "httptools")),
    ("asyncio event loop, other", ("",)),
]


def _samples(path: Path) -> Iterable[tuple[list[str], int]]:
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if count.isdigit():
            yield (stack.split(";") if stack else []), int(count)


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for name, needles in LAYERS[:-1]:
            if any(n in frame for n in needles):
                return name
    return LAYERS[-1][0]


def summarize(path: Path, top: int = 20) -> dict[str, object]:
    """Shares of busy samples by layer, and the functions with the most self time."""
    layers: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for frames, n in _samples(path):
        if any("_find_and_load" in f for f in frames):
            continue  # imports (a profiled child's start), not its work
        total += n
        layers[_layer(frames)] += n
        own[frames[-1].split(" (")[0] if frames else "<native>"] += n
    return {
        "samples": total,
        "layers": {k: v / total for k, v in layers.most_common()} if total else {},
        "self": {k: v / total for k, v in own.most_common(top)} if total else {},
    }


def print_summary(path: Path, top: int = 20) -> None:
    s = summarize(path, top)
    print(f"\n{path}: {s['samples']} busy samples")
    for name, share in s["layers"].items():  # type: ignore[attr-defined]
        print(f"  {share:6.1%}  {name}")
    print("  most self time:")
    for name, share in s["self"].items():  # type: ignore[attr-defined]
        print(f"  {share:6.1%}  {name}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Sum py-spy collapsed stacks by layer.")
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)
    for f in args.files:
        print_summary(f, args.top)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
