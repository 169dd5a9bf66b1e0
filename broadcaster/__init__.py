"""Core of the websocket broadcaster: envelope, codec, key layout, backends, hub, profiles.

Nothing here touches a socket or a web framework; ``gateway`` and ``producers`` build
on it.
"""

from broadcaster.envelope import Envelope, PublishRequest, PublishResult
from broadcaster.errors import (
    BackendUnavailable,
    BroadcasterError,
    PayloadDecodeError,
    PayloadTooLarge,
    ValidationError,
)

__all__ = [
    "BackendUnavailable",
    "BroadcasterError",
    "Envelope",
    "PayloadDecodeError",
    "PayloadTooLarge",
    "PublishRequest",
    "PublishResult",
    "ValidationError",
]
