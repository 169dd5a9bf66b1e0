"""Who may connect, watch and publish: JWTs for sockets and reads, keys for publishing.

Tokens are JWTs (HS256 with ``--auth-secret``, RS256/ES256 with
``--auth-public-key``) with claims ``sub``, ``exp``, ``convs`` (exact ids or glob
patterns) and ``profiles`` (allowed profiles; default ``["default"]``).
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt

from broadcaster.profiles import GlobSet


class AuthError(Exception):
    """``status`` is 401 (no or bad credentials) or 403 (valid but not allowed)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(slots=True, frozen=True)
class Grant:
    """What a token allows; ``None`` patterns mean anything (auth off)."""

    subject: str | None
    convs: GlobSet | None
    profiles: frozenset[str] | None

    def check_conv(self, conv: str) -> None:
        if self.convs is not None and not self.convs.matches(conv):
            raise AuthError(403, f"token does not allow conversation {conv!r}")

    def check_profile(self, profile: str) -> None:
        if self.profiles is not None and profile not in self.profiles:
            raise AuthError(403, f"token does not allow profile {profile!r}")


OPEN_GRANT = Grant(None, None, None)


class Authenticator:
    """Verifies tokens; with no key configured every request gets :data:`OPEN_GRANT`."""

    def __init__(self, secret: str | None = None, public_key: str | None = None) -> None:
        if public_key and not public_key.lstrip().startswith("-----BEGIN") and Path(public_key).is_file():
            public_key = Path(public_key).read_text(encoding="utf-8")
        self._key: str | None = secret or public_key or None
        self._algorithms = ["HS256"] if secret else ["RS256", "ES256"]

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def verify(self, token: str | None) -> Grant:
        """The grant of ``token``; raises AuthError(401) when it is missing, expired or badly signed."""
        if self._key is None:
            return OPEN_GRANT
        if not token:
            raise AuthError(401, "a token is required")
        try:
            claims: dict[str, Any] = jwt.decode(
                token, self._key, algorithms=self._algorithms, options={"require": ["exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.InvalidTokenError as exc:
            raise AuthError(401, f"invalid token: {exc}") from None
        convs, profiles = claims.get("convs", []), claims.get("profiles", ["default"])
        if not isinstance(convs, list) or not all(isinstance(c, str) for c in convs):
            raise AuthError(401, "claim 'convs' must be a list of strings")
        if not isinstance(profiles, list) or not all(isinstance(p, str) for p in profiles):
            raise AuthError(401, "claim 'profiles' must be a list of strings")
        try:
            conv_globs = GlobSet(convs)
        except ValueError as exc:
            raise AuthError(401, f"claim 'convs': {exc}") from None
        subject = claims.get("sub")
        return Grant(subject if isinstance(subject, str) else None, conv_globs, frozenset(profiles))


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


class PublishKeys:
    """The publish keys accepted over HTTP, compared in constant time."""

    def __init__(self, keys: list[str]) -> None:
        self._keys = [k.encode() for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._keys)

    def check(self, authorization: str | None) -> None:
        """Raise AuthError 401 without a key, 403 with a wrong one; no-op when none is configured."""
        if not self._keys:
            return
        given = bearer(authorization)
        if given is None:
            raise AuthError(401, "publishing needs 'Authorization: Bearer <publish key>'")
        candidate = given.encode()
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(candidate, key)
        if not matched:
            raise AuthError(403, "publish key not accepted")


def mint_token(secret: str, *, sub: str = "dev", convs: list[str] | None = None,
               profiles: list[str] | None = None, ttl: int = 3600) -> str:
    """A development HS256 token (see ``broadcaster-gateway token``)."""
    claims = {"sub": sub, "exp": int(time.time()) + ttl, "convs": convs or ["*"], "profiles": profiles or ["default"]}
    return jwt.encode(claims, secret, algorithm="HS256")
