"""The Lua scripts of ``lua/``, read once and registered on a client (EVALSHA, NOSCRIPT-safe)."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Any

from redis.commands.core import AsyncScript


@cache
def source(name: str) -> str:
    return resources.files("buffer").joinpath("lua", f"{name}.lua").read_text()


class Scripts:
    """The buffer pool's scripts, bound to one Redis client."""

    def __init__(self, redis: Any) -> None:
        self.admit: AsyncScript = redis.register_script(source("admit"))
        self.confirm: AsyncScript = redis.register_script(source("confirm"))
        self.finalize: AsyncScript = redis.register_script(source("finalize"))
        self.dead_letter: AsyncScript = redis.register_script(source("dead_letter"))
        self.replay: AsyncScript = redis.register_script(source("replay"))
        self._redis = redis

    async def load(self) -> None:
        """SCRIPT LOAD all of them (pipelines call EVALSHA directly and need them loaded)."""
        for script in (self.admit, self.confirm, self.finalize, self.dead_letter, self.replay):
            script.sha = await self._redis.script_load(script.script)
