"""The command line every peer server shares (--port, --redis-url, --prefix) and its open-files limit.

Standard library only: each peer server runs in a venv of its own, and imports this from its folder.
"""

from __future__ import annotations

import argparse
import resource


def peer_args(doc: str | None, port: int) -> argparse.Namespace:
    """Parse the peer's arguments (``port`` the default) and lift its soft open-files limit to the hard one."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=port)
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--prefix", default="bc")
    args = parser.parse_args()
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return args
