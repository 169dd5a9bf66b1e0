"""Errors only the SDK raises (the shared ones live in :mod:`broadcaster.errors`)."""

from __future__ import annotations

from broadcaster.errors import BroadcasterError


class PublishForbidden(BroadcasterError, PermissionError):
    """The gateway refused the credentials (HTTP 401 / 403): a missing, wrong or unauthorised key.

    ``status`` is the HTTP status; retrying will not help.
    """

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.message = message


class UnexpectedResponse(BroadcasterError):
    """The server answered something the SDK does not understand (e.g. 404: not a gateway URL)."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"unexpected HTTP {status}: {body[:500]}")
        self.status = status
        self.body = body
