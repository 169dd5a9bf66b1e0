"""Backend and gateway URLs in messages: credentials redacted, the address spelled out.

Every error or log line that names a URL goes through :func:`redact_url`, so a
password given in ``redis://user:secret@host`` never reaches a terminal or a log.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlencode

REDACTED = "***"
_SECRET_QUERY_KEYS = frozenset({"password", "pass", "token", "secret", "sentinel_password"})


def redact_url(url: str) -> str:
    """``url`` with the password of its user info and any secret-looking query value replaced by ``***``.

    ``redis://user:pw@h:6379/0`` -> ``redis://user:***@h:6379/0``; ``redis://:pw@h`` ->
    ``redis://:***@h``; a URL without credentials comes back unchanged. Works on
    ``redis+cluster://`` and ``redis+sentinel://`` host lists too (it does not parse them as one host), and
    hides a ``sentinel_password`` query value.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    rest, hash_sep, fragment = rest.partition("#")
    rest, query_sep, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    userinfo, at, hosts = authority.rpartition("@")
    if at:
        user, colon, _password = userinfo.partition(":")
        # A lone user info is hidden whole: redis-py reads redis://secret@host as a password.
        authority = f"{user}:{REDACTED}@{hosts}" if colon else f"{REDACTED}@{hosts}"
    if query_sep:
        pairs = parse_qsl(query, keep_blank_values=True)
        query = urlencode([(k, REDACTED if k.lower() in _SECRET_QUERY_KEYS else v) for k, v in pairs], safe="*")
    out = f"{scheme}://{authority}{slash}{path}"
    if query_sep:
        out += f"?{query}"
    if hash_sep:
        out += f"#{fragment}"
    return out


def url_addresses(url: str) -> str:
    """The ``host:port`` (or ``host:port,host:port`` for a cluster, or the socket path) a URL points at.

    Default ports: 6379 for Redis, 26379 for the sentinels of a ``redis+sentinel://`` URL, 80/443 for
    http(s). Never includes credentials.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    scheme = scheme.lower()
    rest = rest.partition("#")[0].partition("?")[0]
    if scheme == "unix":
        return rest.rpartition("@")[2] or "?"
    authority = rest.partition("/")[0].rpartition("@")[2]
    default_port = {"http": 80, "https": 443, "redis+sentinel": 26379, "rediss+sentinel": 26379}.get(scheme, 6379)
    out = []
    for item in authority.split(","):
        if not item:
            continue
        if item.startswith("["):  # [ipv6]:port
            host, _, port = item[1:].partition("]")
            port = port.lstrip(":")
            host = f"[{host}]"
        else:
            host, _, port = item.rpartition(":") if ":" in item else (item, "", "")
        out.append(f"{host or '?'}:{port or default_port}")
    return ",".join(out) or "?"
