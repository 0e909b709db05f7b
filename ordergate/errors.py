"""Errors of the runtime shell (settings, embedded servers, supervisor)."""


class OrdergateError(Exception):
    """Base class of every error raised by ordergate's runtime shell."""


class ConfigError(OrdergateError):
    """The settings are invalid or a config file cannot be read."""


class ServerStartError(OrdergateError):
    """An embedded Valkey or PostgreSQL server did not start."""


class SurgeError(OrdergateError):
    """A surge test could not run: no gateway, no keys, Locust failed to start."""


class LocustNotInstalled(SurgeError):
    """``ordergate surge`` needs Locust, which is in the ``load`` extra."""
