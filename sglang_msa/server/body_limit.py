"""A request-body limit for the whole server (`max_request_body_mb`), enforced before parsing.

Without it a single caller can post a body of any size, and the server reads and parses all of
it on the event loop every tenant shares. A declared `Content-Length` over the limit is answered
413 before a byte is read; a body without one (chunked) is read up to the limit, answered 413
past it, and otherwise handed on whole.
"""

from __future__ import annotations

import json


def _too_large(limit_bytes: int) -> tuple[dict, dict]:
    body = json.dumps({"error": {
        "message": f"the request body exceeds max_request_body_mb ({limit_bytes / 2**20:g} MiB)",
        "type": "invalid_request_error", "param": "body", "code": 413,
    }}).encode()
    start = {"type": "http.response.start", "status": 413,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                         (b"connection", b"close")]}
    return start, {"type": "http.response.body", "body": body}


class BodyLimitMiddleware:
    """ASGI middleware answering 413 to bodies over `limit_bytes`."""

    def __init__(self, app, limit_bytes: int):
        self.app = app
        self.limit_bytes = limit_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > self.limit_bytes:
                await self._refuse(send)
                return
            await self.app(scope, receive, send)
            return
        if b"chunked" not in headers.get(b"transfer-encoding", b""):
            await self.app(scope, receive, send)
            return
        messages, size = [], 0
        while True:  # read the undeclared body up to the limit, then replay it
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit_bytes:
                await self._refuse(send)
                return
            if not message.get("more_body", False):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send) -> None:
        start, body = _too_large(self.limit_bytes)
        await send(start)
        await send(body)
