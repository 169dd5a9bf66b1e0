"""The enrich hook of the bench's ``bench`` profile (``bench_hooks:add_badge``): one field added per event."""

from __future__ import annotations

from typing import Any


def add_badge(event: dict[str, Any], ctx: Any) -> dict[str, Any]:
    event["badge"] = f"{ctx.profile}:{ctx.gateway_id}:{event['seq']}"
    return event
