"""Errors of the runtime shell (settings, embedded servers, supervisor)."""


class OrdergateError(Exception):
    """Base class of every error raised by ordergate's runtime shell."""


class ConfigError(OrdergateError):
    """The settings are invalid or a config file cannot be read."""


class ServerStartError(OrdergateError):
    """An embedded Valkey or PostgreSQL server did not start."""
