"""The Lua scripts of ``lua/``, read once and registered on a client (EVALSHA, NOSCRIPT-safe)."""

from __future__ import annotations

import weakref
from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    """A script's text; the helpers of ``_lib.lua`` and ``_idem.lua`` (the idempotency record)
    go in front of the scripts that use them."""
    folder = resources.files("ordergate.buffer").joinpath("lua")
    text = folder.joinpath(f"{name}.lua").read_text()
    libs = [lib for lib, users in _LIBS.items() if name in users]
    if libs:
        shebang, _, body = text.partition("\n")  # '#!lua' and its flags stay the first line
        helpers = "\n".join(folder.joinpath(f"{lib}.lua").read_text() for lib in libs)
        text = shebang + "\n" + helpers + "\n" + body
    return text


_LIBS = {
    "_lib": ("taken", "claim", "settle", "replay", "notified"),
    "_idem": ("admit", "confirm", "replay", "notified"),
}


class Scripts:
    """The buffer pool's scripts, bound to one Redis client."""

    NAMES = (
        "admit",
        "confirm",
        "taken",
        "claim",
        "settle",
        "replay",
        "notified",
        "lease",
        "member",
        "own",
        "report",
    )

    def __init__(self, redis: Any) -> None:
        self.admit: AsyncScript = redis.register_script(source("admit"))
        self.confirm: AsyncScript = redis.register_script(source("confirm"))
        self.taken: AsyncScript = redis.register_script(source("taken"))
        self.claim: AsyncScript = redis.register_script(source("claim"))
        self.settle: AsyncScript = redis.register_script(source("settle"))
        self.replay: AsyncScript = redis.register_script(source("replay"))
        self.notified: AsyncScript = redis.register_script(source("notified"))
        self.lease: AsyncScript = redis.register_script(source("lease"))
        self.member: AsyncScript = redis.register_script(source("member"))
        self.own: AsyncScript = redis.register_script(source("own"))
        self.report: AsyncScript = redis.register_script(source("report"))
        self._redis = redis

    async def load(self) -> None:
        """SCRIPT LOAD all of them (pipelines call EVALSHA directly and need them loaded)."""
        for name in self.NAMES:
            script: AsyncScript = getattr(self, name)
            script.sha = await self._redis.script_load(script.script)


_bound: weakref.WeakKeyDictionary[Any, Scripts] = weakref.WeakKeyDictionary()


def scripts_for(redis: Any) -> Scripts:
    """The scripts bound to ``redis``, made once per client (hashing 11 scripts is not free)."""
    scripts = _bound.get(redis)
    if scripts is None:
        scripts = _bound[redis] = Scripts(redis)
    return scripts
