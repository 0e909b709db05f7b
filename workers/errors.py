"""Errors of the workers, sorted so the drain knows whether to retry or to dead-letter."""

from ordergate.errors import OrdergateError


class WorkerError(OrdergateError):
    """Base class of every worker error."""


class TransientPersistError(WorkerError):
    """Postgres could not take the batch now (down, restarting, overloaded): retry, never drop."""


class PermanentPersistError(WorkerError):
    """Postgres refuses this data for good (bad value, constraint): dead-letter the culprit."""


class MigrationError(WorkerError):
    """The schema cannot be brought up to date."""


class LostLane(WorkerError):
    """The connection holding a lane's lock broke: another worker may own the lane now."""


class LockPollFailed(WorkerError):
    """A lane's lock could not be asked for: the connection broke or Postgres did not answer."""


class BreakerOpen(WorkerError):
    """A circuit breaker refused the call: its destination fails or is slow. Defer, retry later."""

    def __init__(self, name: str, retry_in_s: float) -> None:
        super().__init__(f"breaker {name!r} is open; next probe in {retry_in_s:.1f} s")
        self.name = name
        self.retry_in_s = retry_in_s


class WebhookFailed(WorkerError):
    """A webhook delivery got no 2xx (or there is no webhook to deliver to): retry later."""


class LeaseLost(WorkerError):
    """Another notifier holds the lease now (ours expired while Redis was away)."""
