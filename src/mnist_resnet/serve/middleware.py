"""The ASGI middlewares around the app: body size and time limits (with the byte budget of
bodies being read), HEAD as GET, one Host header, and the security headers.
"""

from __future__ import annotations

import asyncio

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mnist_resnet.config import ServeConfig
from mnist_resnet.runtime import trim_freed_memory

MAX_BODY_BYTES = 5 * 1024 * 1024

# A body larger than this leaves its memory to be handed back to the OS once it is answered.
TRIM_BYTES = 1024 * 1024

LOCAL_HOSTS = ("localhost", "127.0.0.1", "::1", "[::1]")

SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    # The page loads its own script and style only, and posts to this origin.
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'self'"
    ),
}


class BodyBudget:
    """Bytes of request bodies one worker holds at once, counted as they arrive: bodies are read
    before a request is admitted to the image work, so this, not the admission limit, is what
    bounds their memory (one event loop per worker: no lock needed)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class BodyIncomplete(HTTPException):
    """The body stopped before its end: the client went away, or its chunked encoding was
    malformed (Granian reports both as a disconnect). A 400 if anyone is still listening."""

    def __init__(self) -> None:
        super().__init__(
            400,
            "request body incomplete: the connection closed before its end, or its chunked "
            "encoding is malformed",
        )


class BodySizeLimit:
    """413 for bodies over `limit` bytes (by Content-Length up front, else while streaming); 408
    when the client pauses longer than `timeout` seconds, or has not sent the whole body within
    `total` seconds; 503 while the worker holds `budget` bytes of bodies; 400 for a body that
    ends early. Bodies over `TRIM_BYTES` hand their memory back to the OS once answered."""

    def __init__(
        self,
        app: ASGIApp,
        limit: int = MAX_BODY_BYTES,
        timeout: float = ServeConfig.body_timeout_s,
        total: float = ServeConfig.request_timeout_s,
        budget: BodyBudget | None = None,
    ) -> None:
        self.app = app
        self.limit = limit
        self.timeout = timeout
        self.total = total
        self.budget = budget or BodyBudget(ServeConfig.max_concurrency * limit)
        self.trimming = False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope.get("headers", []):
            if name == b"content-length" and (not value.isdigit() or int(value) > self.limit):
                await send_json(send, 413, f"request body over {self.limit:,} bytes")
                return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.total
        seen = 0
        taken = 0
        complete = False

        async def limited() -> Message:
            nonlocal seen, taken, complete
            if complete:  # after the body, receive() waits for a disconnect: no deadline
                return await receive()
            left = deadline - loop.time()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.timeout, left)))
            except TimeoutError:
                # Raised inside the endpoint's body parsing; FastAPI answers it.
                if left <= self.timeout:
                    reason = f"not complete within {self.total:g} s"
                else:
                    reason = f"no data for {self.timeout:g} s"
                raise HTTPException(408, f"request body not received: {reason}") from None
            if message["type"] == "http.disconnect":
                complete = True
                raise BodyIncomplete()
            size = len(message.get("body", b""))
            seen += size
            complete = not message.get("more_body", False)
            if seen > self.limit:
                raise HTTPException(413, f"request body over {self.limit:,} bytes")
            if not self.budget.take(size):
                raise HTTPException(
                    503, "server busy: too many request bodies at once", {"Retry-After": "1"}
                )
            taken += size
            return message

        try:
            await self.app(scope, limited, send)
        finally:
            self.budget.give(taken)
            if taken > TRIM_BYTES and not self.trimming:
                self.trimming = True
                loop.run_in_executor(None, self._trim)

    def _trim(self) -> None:
        # A large JSON body became millions of small objects; freed, they leave holes in the
        # heaps of the threads that parsed it, which glibc keeps unless asked (docs/serving.md).
        self.trimming = False
        trim_freed_memory()


async def send_json(send: Send, status: int, detail: str) -> None:
    body = JSONResponse({"detail": detail}, status_code=status).body
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """The headers every response carries: no MIME sniffing, no framing, a strict CSP."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.headers = [(k.lower().encode(), v.encode()) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *self.headers]
            await send(message)

        await self.app(scope, receive, with_headers)


class HeadAsGet:
    """HEAD answered as the GET of the same path would be, without the body (RFC 9110: a
    server that answers GET answers HEAD)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            await self.app(scope, receive, send)
            return

        async def headers_only(message: Message) -> None:
            if message["type"] == "http.response.body":
                message = {**message, "body": b""}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, headers_only)


class OneHostHeader:
    """400 for a request with several Host (or Content-Length) headers: which one counts
    differs between proxies and servers, so the host check could be passed with one and the
    request routed by the other."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            names = [name for name, _ in scope.get("headers", [])]
            for header in (b"host", b"content-length"):
                if names.count(header) > 1:
                    await send_json(send, 400, f"more than one {header.decode()} header")
                    return
        await self.app(scope, receive, send)
