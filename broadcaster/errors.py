"""Exceptions shared by every package of the project."""

from __future__ import annotations


class BroadcasterError(Exception):
    """Base class of every error this project raises on purpose."""


class ValidationError(BroadcasterError, ValueError):
    """Input that breaks the contract: raised before anything reaches a backend.

    ``field`` names the offending input (``conv_id``, ``type``, ``data``, ...).
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PayloadTooLarge(ValidationError):
    """Event data whose encoded size is over the configured limit."""


class PayloadDecodeError(BroadcasterError):
    """Bytes from a backend that are not a valid version-1 envelope."""


class BackendUnavailable(BroadcasterError):
    """The backend stayed unreachable for the whole retry budget."""


class NotReplicated(BackendUnavailable):
    """A publish the master applied but fewer replicas than asked acknowledged in time (``wait_replicas``).

    Not an acknowledgement: the event may survive a failover or be lost with the old
    master. Publishing it again with the same id is safe (a duplicate if it was kept).
    ``results`` are what the master answered; ``acked`` the replicas that confirmed.
    """

    def __init__(self, message: str, results: list[object], acked: int) -> None:
        super().__init__(message)
        self.results = results
        self.acked = acked
