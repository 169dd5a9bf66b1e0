"""Load a key prefix's function library as a gateway would, for tests that publish with the SDK alone.

Publishing straight to Redis FCALLs the library the gateways load (docs/namespaces.md);
a test with no gateway of its own loads it here, with the policy it wants.
"""

from __future__ import annotations

import contextlib

import redis

from broadcaster.backend import BackendSettings
from broadcaster.backends import scripts


def load_library(url: str, prefix: str, settings: BackendSettings | None = None) -> scripts.FunctionLibrary:
    """FUNCTION LOAD REPLACE the library of ``prefix`` with ``settings``' policy (default: the gateway defaults)."""
    library = scripts.build_library(prefix, (settings or BackendSettings()).policy_table())
    with contextlib.closing(redis.Redis.from_url(url)) as client:
        has_sha1 = bool(client.execute_command(*scripts.SCRIPTS_HAVE_SHA1))
        client.function_load(scripts.library_code(library, has_sha1), replace=True)
    return library


def drop_library(url: str, prefix: str) -> None:
    """Delete the library of ``prefix`` (tests share a Redis: leave nothing behind)."""
    with contextlib.closing(redis.Redis.from_url(url)) as client, contextlib.suppress(redis.ResponseError):
        client.function_delete(scripts.library_name(prefix))
