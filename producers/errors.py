"""Errors only the SDK raises (the shared ones live in :mod:`broadcaster.errors`)."""

from __future__ import annotations

from broadcaster.errors import BroadcasterError


class PublishForbidden(BroadcasterError, PermissionError):
    """The gateway refused the credentials (HTTP 401 / 403): a missing, wrong or unauthorised key.

    ``status`` is the HTTP status; retrying will not help.
    """

    def __init__(self, status: int, message: str, url: str | None = None) -> None:
        super().__init__(f"{url + ': ' if url else ''}HTTP {status}: {message}")
        self.status = status
        self.message = message
        self.url = url
        """The gateway that answered (credentials redacted), when known."""


class UnexpectedResponse(BroadcasterError):
    """The server answered something the SDK does not understand (e.g. 404: not a gateway URL)."""

    def __init__(self, status: int, body: str, url: str | None = None) -> None:
        hint = " (is this the address of a broadcaster gateway?)" if status == 404 else ""
        super().__init__(f"{url + ': ' if url else ''}unexpected HTTP {status}{hint}: {body[:500]}")
        self.status = status
        self.body = body
        self.url = url
