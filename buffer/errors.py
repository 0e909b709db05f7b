"""Errors of the buffer pool; the gateway maps each to one HTTP problem in one place."""

from ordergate.errors import OrdergateError


class BufferPoolError(OrdergateError):
    """Base class of every buffer pool error."""


class BufferUnavailable(BufferPoolError):
    """Redis did not confirm the operation (down, paused, timed out, out of memory, no stream)."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class NotDurable(BufferUnavailable):
    """The write reached Redis but its durability (fsync / replica) was not confirmed in time."""


class DeploymentMismatch(BufferPoolError):
    """Redis holds a buffer of this key prefix with another shard count."""


class MalformedMessage(BufferPoolError):
    """A stream entry does not follow the message contract (a poison message)."""


class InvalidWebhook(BufferPoolError):
    """A webhook URL that is not an absolute http(s) URL."""


class LaneFenced(BufferPoolError):
    """Another worker took the lane: this owner's epoch is no longer the lane's."""
