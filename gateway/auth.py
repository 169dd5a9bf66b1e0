"""Who may connect, watch and publish: JWTs for sockets and reads, keys for publishing.

Tokens are JWTs (HS256 with ``--auth-secret``, RS256/ES256 with
``--auth-public-key``) with claims ``sub``, ``exp``, ``convs`` (exact ids or glob
patterns) and ``profiles`` (allowed profiles; default ``["default"]``).

The algorithm is fixed by the configured key, never taken from the token: an
HS256 gateway accepts only HS256, an RSA public key only RS256, a P-256 key only
ES256 (no ``alg: none``, no HMAC signed with the public key). Every failure to
verify a token - whatever PyJWT or the crypto library raises - becomes an
:class:`AuthError`, so no token can make a handshake fail any other way.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from broadcaster.profiles import GlobSet
from broadcaster.validation import is_valid_name

log = logging.getLogger("gateway.auth")

MAX_TOKEN_LENGTH = 8192
"""Longer tokens are refused (401) before any decoding: bounded work per handshake."""
MIN_SECRET_BYTES = 32
"""HS256 secrets shorter than this are accepted with a warning at start-up (RFC 7518 §3.2)."""


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
    expires: float | None = None
    """The token's ``exp`` (seconds since the epoch); None with auth off."""
    info: Any = None
    """The token's ``info`` claim (any JSON value; shown in presence and ws.join), if it has one."""

    def check_conv(self, conv: str) -> None:
        if self.convs is not None and not self.convs.matches(conv):
            raise AuthError(403, f"token does not allow conversation {conv!r}")

    def check_profile(self, profile: str) -> None:
        if self.profiles is not None and profile not in self.profiles:
            raise AuthError(403, f"token does not allow profile {profile!r}")


OPEN_GRANT = Grant(None, None, None)


def load_public_key(value: str) -> tuple[Any, list[str]]:
    """The key object and its only algorithm, from PEM text or a PEM file; raises ValueError."""
    text = value
    if not value.lstrip().startswith("-----BEGIN"):
        path = Path(value)
        if not path.is_file():
            raise ValueError(f"--auth-public-key {value!r} is neither PEM text nor a readable file")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ValueError(f"--auth-public-key {value!r}: cannot read: {exc}") from None
    try:
        key = load_pem_public_key(text.encode())
    except (ValueError, TypeError) as exc:
        raise ValueError(f"--auth-public-key: not a PEM public key ({exc})") from None
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < 2048:
            raise ValueError(f"--auth-public-key: RSA key of {key.key_size} bits; at least 2048 needed")
        return key, ["RS256"]
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key, ["ES256"]
    raise ValueError(f"--auth-public-key: unsupported key type {type(key).__name__}; give an RSA or P-256 key")


class Authenticator:
    """Verifies tokens; with no key configured every request gets :data:`OPEN_GRANT`.

    ``audience`` / ``issuer``, when given, must match the token's ``aud`` / ``iss``.
    Without ``audience``, a token carrying an ``aud`` claim is refused (PyJWT's rule:
    a token meant for a named audience is not accepted by a verifier that has none).
    """

    def __init__(self, secret: str | None = None, public_key: str | None = None, *,
                 audience: str | None = None, issuer: str | None = None) -> None:
        if secret and public_key:
            raise ValueError("give --auth-secret or --auth-public-key, not both")
        self._key: Any = None
        self._algorithms: list[str] = []
        self._key_warns = True
        """PyJWT may warn (InsecureKeyLengthWarning) on every decode with this key: silenced per decode.
        False only for an HS256 secret of at least 32 bytes, where PyJWT never warns (digest size)."""
        if secret:
            if len(secret.encode()) < MIN_SECRET_BYTES:
                log.warning("--auth-secret is shorter than %d bytes; use a long random secret in production",
                            MIN_SECRET_BYTES)
            try:
                key = jwt.algorithms.HMACAlgorithm(jwt.algorithms.HMACAlgorithm.SHA256).prepare_key(secret)
            except jwt.PyJWTError as exc:
                raise ValueError(f"--auth-secret: {exc}") from None
            self._key, self._algorithms = key, ["HS256"]
            self._key_warns = len(secret.encode()) < MIN_SECRET_BYTES
        elif public_key:
            self._key, self._algorithms = load_public_key(public_key)
        self._audience = audience or None
        self._issuer = issuer or None
        self.refuse_subject: Callable[[str], str | None] | None = None
        """Set by the gateway (revocation): given a token's ``sub``, a reason to refuse it (403), or None."""

    @property
    def enabled(self) -> bool:
        return self._key is not None

    @property
    def algorithms(self) -> Sequence[str]:
        return tuple(self._algorithms)

    def verify(self, token: str | None) -> Grant:
        """The grant of ``token``; raises AuthError(401) when it is missing, expired or invalid."""
        if self._key is None:
            return OPEN_GRANT
        if not token:
            raise AuthError(401, "a token is required")
        if len(token) > MAX_TOKEN_LENGTH:
            raise AuthError(401, f"token longer than {MAX_TOKEN_LENGTH} characters")
        claims = self._decode(token)
        convs, profiles = claims.get("convs", []), claims.get("profiles", ["default"])
        if not isinstance(convs, list) or not all(isinstance(c, str) for c in convs):
            raise AuthError(401, "claim 'convs' must be a list of strings")
        if not isinstance(profiles, list) or not all(is_valid_name(p) for p in profiles):
            raise AuthError(401, "claim 'profiles' must be a list of profile names")
        try:
            conv_globs = GlobSet(convs)
        except ValueError as exc:
            raise AuthError(401, f"claim 'convs': {exc}") from None
        subject, expires = claims.get("sub"), claims.get("exp")
        if isinstance(subject, str) and self.refuse_subject is not None:
            refusal = self.refuse_subject(subject)
            if refusal is not None:
                raise AuthError(403, refusal)
        return Grant(subject if isinstance(subject, str) else None, conv_globs, frozenset(profiles),
                     float(expires) if isinstance(expires, (int, float)) else None, claims.get("info"))

    def _decode(self, token: str) -> dict[str, Any]:
        try:
            if self._key_warns:  # warned once at start-up; catch_warnings would cost every handshake otherwise
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
                    claims = self._jwt_decode(token)
            else:
                claims = self._jwt_decode(token)
        except jwt.ExpiredSignatureError:
            raise AuthError(401, "token expired") from None
        except jwt.PyJWTError as exc:
            raise AuthError(401, f"invalid token: {str(exc)[:120]}") from None
        except Exception as exc:  # the crypto layer on hostile input: still just a bad token
            raise AuthError(401, f"invalid token ({exc.__class__.__name__})") from None
        if not isinstance(claims, dict):
            raise AuthError(401, "invalid token: claims are not a JSON object")
        return claims

    def _jwt_decode(self, token: str) -> Any:
        return jwt.decode(token, self._key, algorithms=self._algorithms, audience=self._audience,
                          issuer=self._issuer, options={"require": ["exp"]})


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, or None."""
    if authorization and authorization[:7].lower() == "bearer ":
        return authorization[7:].strip() or None
    return None


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()


class PublishKeys:
    """The publish keys accepted over HTTP, compared in constant time.

    Several keys may be active at once (rotation: add the new key, move the
    producers, drop the old one). Keys are compared as SHA-256 digests with
    :func:`hmac.compare_digest`, and every key is compared, so neither the
    length nor the position of a matching key shows in the response time.
    """

    def __init__(self, keys: list[str]) -> None:
        self._digests = [_digest(k.encode()) for k in keys if k]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise AuthError 401 without a key, 403 with a wrong one; no-op when none is configured."""
        if not self._digests:
            return
        given = bearer(authorization)
        if given is None:
            raise AuthError(401, "publishing needs 'Authorization: Bearer <publish key>'")
        candidate = _digest(given.encode(errors="surrogatepass"))
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(candidate, digest)
        if not matched:
            raise AuthError(403, "publish key not accepted")


def mint_token(secret: str, *, sub: str = "dev", convs: list[str] | None = None,
               profiles: list[str] | None = None, ttl: int = 3600) -> str:
    """A development HS256 token (see ``broadcaster-gateway token``); ``convs`` defaults to ``["*"]``."""
    claims = {"sub": sub, "exp": int(time.time()) + ttl, "convs": ["*"] if convs is None else convs,
              "profiles": ["default"] if profiles is None else profiles}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", jwt.InsecureKeyLengthWarning)
        return jwt.encode(claims, secret, algorithm="HS256")
