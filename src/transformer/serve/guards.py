"""What stands between a client and the model: the shape of a refusal, the API key, the request body's size and
time limits, the header time-out, the Host names answered, refusals slowed for a client that keeps asking for
them, and the refusal to listen beyond loopback without a key. Each guard is an ASGI middleware (or uvicorn
protocol) that answers before a route runs."""

import asyncio
import hmac
import logging
import time
from typing import Optional

from ..errors import TransformerError
from .openai import PATHS as OPENAI_PATHS
from .openai import error_body

log = logging.getLogger("transformer")

LOOPBACK = ("127.0.0.1", "localhost", "::1")


def error_response(path: str, status: int, message: str, param=None, code=None, headers=None):
    """The JSON error of a route: OpenAI's shape on its routes, {"detail": ...} on the others."""
    from fastapi.responses import JSONResponse

    openai = path.startswith(OPENAI_PATHS)
    body = error_body(status, message, param, code) if openai else {"detail": message}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """ASGI middleware: the request body is read whole before the route sees it: over `limit` bytes it is a 413
    (whether or not it declared its length: a chunked body is counted as it comes), and a client that takes
    over `timeout` seconds to send it (a byte a second) gets a 408 and is let go."""

    def __init__(self, app, limit: int, timeout: float) -> None:
        self.app, self.limit, self.timeout = app, limit, timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send, 413)
        try:
            body = await asyncio.wait_for(self._read(receive), self.timeout)
        except asyncio.TimeoutError:
            return await self._refuse(scope, receive, send, 408)
        except _TooLarge:
            return await self._refuse(scope, receive, send, 413)
        if body is None:  # the client went away
            return
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: a disconnect, for the routes that watch for one

        await self.app(scope, replay, send)

    async def _read(self, receive) -> Optional[bytes]:
        chunks, seen = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            seen += len(chunk)
            if seen > self.limit:
                raise _TooLarge()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def _refuse(self, scope, receive, send, status: int) -> None:
        message = (
            f"request body over {self.limit} bytes (--max-body-bytes)"
            if status == 413
            else f"the request body took over {self.timeout:g} s to arrive (--body-timeout)"
        )
        response = error_response(scope["path"], status, message)
        response.headers["Connection"] = "close"
        await response(scope, receive, send)


class _TooLarge(Exception):
    pass


class ApiKey:
    """ASGI middleware: every request but /health and the page (which holds no data: it asks for the key)
    needs `Authorization: Bearer <key>`; a missing or wrong one is a 401 (compared in constant time)."""

    OPEN = ("/health", "/")

    def __init__(self, app, key: str) -> None:
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in self.OPEN:
            return await self.app(scope, receive, send)
        given = dict(scope.get("headers") or []).get(b"authorization", b"")
        if hmac.compare_digest(given, b"Bearer " + self.key):
            return await self.app(scope, receive, send)
        message = "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
        response = error_response(scope["path"], 401, message, None, "invalid_api_key")
        response.headers["WWW-Authenticate"] = "Bearer"
        await response(scope, receive, send)


class SlowRefusals:
    """ASGI middleware: a client address whose requests are refused (4xx) more than `rate` times a second is
    answered its further refusals `delay` seconds late. A client that floods the server with requests it must
    refuse (each cheap to refuse, but thousands a second) is slowed to about `rate` a second, holding a sleeping
    connection rather than the event loop; its well-formed requests, and every other client's, are not delayed.
    `rate` 0: off. The count is a leaky bucket per address (`rate` refusals a second drain it), so a client's
    occasional mistakes, or a short burst of up to `rate`, are answered at once. At most `sleeping` refusals wait
    at a time (the others are answered at once), so a flood over many connections cannot fill the server's
    connection limit with them."""

    clock, sleep = staticmethod(time.monotonic), staticmethod(asyncio.sleep)  # (a test's to replace)

    def __init__(self, app, rate: float, delay: float = 1.0, addresses: int = 10_000, sleeping: int = 64) -> None:
        self.app, self.rate, self.delay, self.addresses = app, rate, delay, addresses
        self.buckets: dict[str, tuple[float, float]] = {}  # address -> (refusals counted, when)
        self.sleeping, self.most_sleeping = 0, sleeping

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.rate:
            return await self.app(scope, receive, send)
        address = (scope.get("client") or ("?",))[0]

        async def send_late(message):
            refused = message["type"] == "http.response.start" and 400 <= message["status"] < 500
            if refused and self.over(address) and self.sleeping < self.most_sleeping:
                self.sleeping += 1
                try:
                    await self.sleep(self.delay)
                finally:
                    self.sleeping -= 1
            await send(message)

        await self.app(scope, receive, send_late)

    def over(self, address: str) -> bool:
        """Count one refusal for `address`; whether it is over the rate."""
        now = self.clock()
        count, then = self.buckets.pop(address, (0.0, now))
        count = max(0.0, count - (now - then) * self.rate) + 1
        if len(self.buckets) >= self.addresses:  # forget the address refused longest ago (dicts keep order)
            del self.buckets[next(iter(self.buckets))]
        self.buckets[address] = (count, now)
        return count > self.rate


def default_hosts(host: str) -> list[str]:
    """The Host headers a server on `host` answers: loopback names for a loopback server, its own name (and
    loopback's) for a named host, any for 0.0.0.0 or :: (the API key guards it)."""
    local = ["127.0.0.1", "localhost", "::1"]
    if host in ("0.0.0.0", "::"):
        return ["*"]
    return local if host in LOOPBACK or host.startswith("127.") else [host, *local]


def header_timeout_protocol(timeout: float):
    """uvicorn's HTTP protocol, but a client that has not sent a request's headers within `timeout` seconds of
    starting it (or of connecting) is disconnected (uvicorn has no such limit: a client sending a byte a second
    would hold its connection for ever). None where httptools (uvicorn's fast parser) is missing."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in the serve extra
        return "auto"

    class Protocol(HttpToolsProtocol):
        header_timer = None

        def _arm(self) -> None:
            self._disarm()
            self.header_timer = self.loop.call_later(timeout, self._too_slow)

        def _disarm(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def _too_slow(self) -> None:
            self.header_timer = None
            if self.transport is not None and not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

    return Protocol


def check_exposure(host: str, api_key: Optional[str], insecure: bool) -> None:
    """Refuse to listen beyond loopback without an API key, unless `insecure` (then warn)."""
    if host in LOOPBACK or host.startswith("127.") or api_key:
        return
    if not insecure:
        raise TransformerError(
            f"--host {host} makes the server reachable from other machines: give it an API key (--api-key KEY or "
            "the TRANSFORMER_API_KEY environment variable), or --insecure to serve anyone who can reach it"
        )
    log.warning("serving on %s without an API key (--insecure): anyone who can reach this port can use it", host)
