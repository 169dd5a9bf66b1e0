"""Publishing through a gateway's HTTP API (CONTRACT §2), blocking or asyncio.

:class:`HttpProtocol` holds everything but the I/O — request building and the
mapping of answers to results and errors — so the two httpx drivers below only
send. Connection errors, timeouts and 5xx answers are retried under the shared
:class:`RetryPolicy` (the event keeps its id, so a retry never doubles it); 422
raises :class:`ValidationError`, 413 :class:`PayloadTooLarge`, 401/403
:class:`PublishForbidden`. ``publish_many`` sends one request per event, in order
(the HTTP API has no batch endpoint).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson

from broadcaster.backend import Presence
from broadcaster.envelope import PublishResult
from broadcaster.errors import BroadcasterError, PayloadTooLarge, ValidationError
from broadcaster.retry import RetryPolicy
from broadcaster.urls import redact_url
from broadcaster.validation import validate_conv_id
from producers.errors import PublishForbidden, UnexpectedResponse
from producers.options import Outgoing, ProducerOptions


class ServerError(BroadcasterError):
    """A 5xx answer: the gateway (or its backend) is in trouble; retried like a lost connection."""

    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"HTTP {status}: {body[:300]}")
        self.status = status


def is_transient_http_error(exc: BaseException) -> bool:
    return isinstance(exc, (httpx.TransportError, ServerError))


@dataclass(frozen=True, slots=True)
class HttpCall:
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes | None = None


class HttpProtocol:
    """Requests and answer handling of the gateway's HTTP API, free of I/O."""

    def __init__(self, options: ProducerOptions, base_url: str | None = None) -> None:
        self.options = options
        self.url = redact_url(base_url) if base_url else None

    def publish_call(self, out: Outgoing) -> HttpCall:
        request = out.request
        body: dict[str, Any] = {"type": request.type, "data": request.data, "id": out.prepared.id}
        if request.key is not None:
            body["key"] = request.key
        if request.op is not None:
            body["op"] = request.op
        headers = {"content-type": "application/json"}
        if self.options.publish_key:
            headers["authorization"] = f"Bearer {self.options.publish_key}"
        return HttpCall("POST", f"/v1/conversations/{request.conv}/events", headers, orjson.dumps(body))

    def presence_call(self, conv: str) -> HttpCall:
        headers = {"authorization": f"Bearer {self.options.token}"} if self.options.token else {}
        return HttpCall("GET", f"/v1/conversations/{validate_conv_id(conv)}/presence", headers)

    def disconnect_call(self, message: dict[str, Any]) -> HttpCall:
        """``POST /v1/disconnect`` of a disconnect control message (its ``until`` in ms sent as an ISO time)."""
        body = {k: v for k, v in message.items() if k != "kind"}
        if "until" in body:
            body["until"] = datetime.fromtimestamp(body["until"] / 1000, UTC).isoformat(timespec="milliseconds")
        headers = {"content-type": "application/json"}
        if self.options.publish_key:
            headers["authorization"] = f"Bearer {self.options.publish_key}"
        return HttpCall("POST", "/v1/disconnect", headers, orjson.dumps(body))

    def parse_disconnect(self, status: int, content: bytes) -> dict[str, Any]:
        sent: dict[str, Any] = self._checked(status, content, ok=(200, 202))["sent"]
        return sent

    def parse_publish(self, status: int, content: bytes) -> PublishResult:
        body = self._checked(status, content)
        return PublishResult(body["conv_id"], int(body["seq"]), body["id"], body["epoch"],
                             duplicate=bool(body["duplicate"]))

    def parse_presence(self, status: int, content: bytes) -> Presence:
        body = self._checked(status, content)
        return Presence(int(body["connections"]), {str(k): int(v) for k, v in body["by_profile"].items()})

    def _checked(self, status: int, content: bytes, ok: tuple[int, ...] = (200,)) -> Any:
        """The JSON body of a 200 (or another status of ``ok``); the matching exception for anything else."""
        text = content.decode("utf-8", "replace")
        if status in ok:
            try:
                return orjson.loads(content)
            except orjson.JSONDecodeError:
                raise UnexpectedResponse(status, text, self.url) from None
        if status >= 500:
            raise ServerError(status, text)
        error = _error_body(content)
        message = str(error.get("message") or text)
        if status == 422:
            raise ValidationError(str(error.get("field") or "body"), message)
        if status == 413:
            raise PayloadTooLarge(str(error.get("field") or "data"), message)
        if status in (401, 403):
            raise PublishForbidden(status, message, self.url)
        raise UnexpectedResponse(status, text, self.url)


def _error_body(content: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(content)
    except orjson.JSONDecodeError:
        return {}
    return body if isinstance(body, dict) else {}


class SyncHttpTransport:
    """Blocking HTTP transport (one httpx.Client, keep-alive)."""

    def __init__(self, base_url: str, options: ProducerOptions) -> None:
        self.protocol = HttpProtocol(options, base_url)
        self.retry = RetryPolicy(budget=options.retry_budget, is_transient=is_transient_http_error)
        self.client = httpx.Client(base_url=base_url, timeout=options.timeout)

    def _send(self, call: HttpCall) -> httpx.Response:
        return self.client.request(call.method, call.path, headers=call.headers, content=call.body)

    def publish_many(self, batch: Sequence[Outgoing]) -> list[PublishResult]:
        results = []
        for out in batch:
            call = self.protocol.publish_call(out)

            def attempt(call: HttpCall = call) -> PublishResult:
                response = self._send(call)
                return self.protocol.parse_publish(response.status_code, response.content)

            results.append(self.retry.call(attempt))
        return results

    def presence(self, conv: str) -> Presence:
        call = self.protocol.presence_call(conv)

        def attempt() -> Presence:
            response = self._send(call)
            return self.protocol.parse_presence(response.status_code, response.content)

        return self.retry.call(attempt)

    def disconnect(self, message: dict[str, Any]) -> dict[str, Any]:
        call = self.protocol.disconnect_call(message)

        def attempt() -> dict[str, Any]:
            response = self._send(call)
            return self.protocol.parse_disconnect(response.status_code, response.content)

        return self.retry.call(attempt)

    def close(self) -> None:
        self.client.close()


class AsyncHttpTransport:
    """Asyncio HTTP transport (one httpx.AsyncClient, keep-alive)."""

    def __init__(self, base_url: str, options: ProducerOptions) -> None:
        self.protocol = HttpProtocol(options, base_url)
        self.retry = RetryPolicy(budget=options.retry_budget, is_transient=is_transient_http_error)
        self.client = httpx.AsyncClient(base_url=base_url, timeout=options.timeout)

    async def _send(self, call: HttpCall) -> httpx.Response:
        return await self.client.request(call.method, call.path, headers=call.headers, content=call.body)

    async def publish_many(self, batch: Sequence[Outgoing]) -> list[PublishResult]:
        results = []
        for out in batch:
            call = self.protocol.publish_call(out)

            async def attempt(call: HttpCall = call) -> PublishResult:
                response = await self._send(call)
                return self.protocol.parse_publish(response.status_code, response.content)

            results.append(await self.retry.acall(attempt))
        return results

    async def presence(self, conv: str) -> Presence:
        call = self.protocol.presence_call(conv)

        async def attempt() -> Presence:
            response = await self._send(call)
            return self.protocol.parse_presence(response.status_code, response.content)

        return await self.retry.acall(attempt)

    async def disconnect(self, message: dict[str, Any]) -> dict[str, Any]:
        call = self.protocol.disconnect_call(message)

        async def attempt() -> dict[str, Any]:
            response = await self._send(call)
            return self.protocol.parse_disconnect(response.status_code, response.content)

        return await self.retry.acall(attempt)

    async def close(self) -> None:
        await self.client.aclose()
