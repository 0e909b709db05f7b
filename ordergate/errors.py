"""The root of every ordergate error, and the shell's own family under it.

Each package has its family in its own ``errors.py``, all under :class:`OrdergateError`:
``gateway.errors.Problem`` (answered as problem+json), ``buffer.errors.BufferPoolError``,
``workers.errors.WorkerError``, and the shell's below.
"""


class OrdergateError(Exception):
    """Base class of every error ordergate raises on purpose."""


class ShellError(OrdergateError):
    """Base class of the runtime shell's errors (settings, servers, commands)."""


class ConfigError(ShellError):
    """The settings are invalid or a config file cannot be read."""


class CommandError(ShellError):
    """A command cannot do what it was asked (no such key, nothing named, a bad flag)."""


class ServerStartError(ShellError):
    """An embedded Valkey or PostgreSQL server did not start."""


class SurgeError(ShellError):
    """A surge test could not run: no gateway, no keys, Locust failed to start."""


class LocustNotInstalled(SurgeError):
    """``ordergate surge`` needs Locust, which is in the ``load`` extra."""
