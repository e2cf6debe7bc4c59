"""The hardening of ``cxrlab serve``: option checks before any work, and one ASGI middleware in front of
the app that, in this order, checks the Host header (400), the bearer token (401), the number of
uploads in flight (503), the body size while it streams in (413) and how long the body takes (408),
and adds the security headers to every answer, its own refusals included.

Standard library only: the checks run before FastAPI or the model are loaded.
"""
from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import math
import socket
import tempfile

from ..errors import CxrlabError

TOKEN_ENV = "CXRLAB_TOKEN"
MIN_TOKEN_CHARS = 16
LOCAL_NAMES = ("localhost", "127.0.0.1", "::1")
# what a browser may fetch without the token: the page shell, its files, the API description and the
# liveness probe; none of them carries a model output or accepts an upload
OPEN_PATHS = ("/", "/health", "/docs", "/openapi.json", "/favicon.ico")
OPEN_PREFIXES = ("/static/",)
# the page loads its script and style from this server only, shows blob: images, and is never framed;
# 'unsafe-inline' styles: the /docs page carries its stylesheet inline (no script is inline anywhere)
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' blob: data:; "
       "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"), (b"content-security-policy", CSP.encode()),
                    (b"cross-origin-opener-policy", b"same-origin"),
                    (b"cross-origin-resource-policy", b"same-origin"))
SPOOL_IN_MEMORY = 2**20  # a body larger than this waits for the app in a file, not in memory
REPLAY_CHUNK = 2**18
DRAIN_BYTES = 4 * 2**20  # after the limit: read at most this much more (so a polite client sees the 413) ...
DRAIN_SECONDS = 1.0      # ... for at most this long, then answer and close


# ----------------------------------------------------------------------------------------- options

def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def allowed_hosts(bind_host: str, extra: str | None = None) -> tuple[str, ...]:
    """The Host names the server answers: ``extra`` (comma-separated; ``*`` for any) or, by default, the
    bound address (unless it is a wildcard) and the loopback names."""
    if extra is not None:
        names = tuple(n.strip().lower().strip("[]") for n in extra.split(",") if n.strip())
        if not names:
            raise CxrlabError(f"--allowed-hosts {extra!r}: expected comma-separated host names, or '*' for any")
        return names
    wildcard = bind_host in ("0.0.0.0", "::", "")
    return tuple(dict.fromkeys(([] if wildcard else [bind_host.lower().strip("[]")]) + list(LOCAL_NAMES)))


def check_serve_options(host: str, port: int, workers: int, queue: int, timeout: float, max_upload_mb: float,
                        read_timeout: float, max_uploads: int | None, token: str | None,
                        allow_remote_without_token: bool) -> None:
    """Every ``serve`` option, before the model is loaded: one line naming the first bad one."""
    def finite_positive(name, value):
        if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise CxrlabError(f"{name} {value!r}: expected a finite number > 0")

    if not 1 <= port <= 65535:
        raise CxrlabError(f"--port {port}: expected 1-65535")
    if workers < 1:
        raise CxrlabError(f"--workers {workers}: expected at least 1")
    if queue < 0:
        raise CxrlabError(f"--queue {queue}: expected 0 or more")
    if max_uploads is not None and max_uploads < 1:
        raise CxrlabError(f"--max-uploads {max_uploads}: expected at least 1")
    finite_positive("--timeout", timeout)
    finite_positive("--max-upload-mb", max_upload_mb)
    finite_positive("--read-timeout", read_timeout)
    if token is not None and len(token) < MIN_TOKEN_CHARS:
        raise CxrlabError(f"the token has {len(token)} characters; use at least {MIN_TOKEN_CHARS}, e.g. "
                          "python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    if not is_loopback(host) and token is None and not allow_remote_without_token:
        raise CxrlabError(f"--host {host} is not a loopback address: anyone who reaches it could use the model; "
                          f"set a token (--token or {TOKEN_ENV}) or, behind a proxy that authenticates, pass "
                          "--allow-remote-without-token")


def check_can_listen(host: str, port: int) -> None:
    """Bind and release ``host:port`` now, so a busy port or a wrong address stops the start before the
    model is loaded (uvicorn would say so only after)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does
            probe.bind(address)
    except OSError as exc:
        raise CxrlabError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None


# -------------------------------------------------------------------------------------- middleware

def host_name(value: bytes) -> str:
    """``Example.org:8000`` -> ``example.org``; ``[::1]:8000`` -> ``::1``."""
    text = value.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1:text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


class Guard:
    """ASGI middleware: Host allow-list, bearer token, in-flight upload cap, streamed body limit with a
    deadline, and security headers (see the module's docstring).

    A body is counted as it streams in and kept in a file beyond ``SPOOL_IN_MEMORY`` bytes, so a slow
    upload costs memory only up to that; at most ``max_uploads`` bodies are in flight (received or being
    answered), more get 503 before any of their bytes is read. A body that passes ``limit`` is answered
    413 after at most ``DRAIN_BYTES``/``DRAIN_SECONDS`` more and the connection closed: the rest is
    never read. A body not complete within ``read_timeout`` seconds of its headers gets 408."""

    def __init__(self, app, limit: int, token: str | None = None, hosts=("*",), max_uploads: int = 10,
                 read_timeout: float = 60.0, spool_dir=None):
        self.app, self.limit, self.max_uploads, self.read_timeout = app, int(limit), int(max_uploads), read_timeout
        self.token = token.encode() if token else None
        self.hosts = None if "*" in hosts else frozenset(hosts)
        self.spool_dir = str(spool_dir) if spool_dir else None
        self.uploads = 0  # bodies in flight; only touched on the event loop

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        send = self._with_headers(scope, send)
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and host_name(headers.get(b"host", b"")) not in self.hosts:
            shown = headers.get(b"host", b"").decode("latin-1")[:100]
            return await refuse(send, 400, f"Host {shown!r} is not served here (allowed: "
                                f"{', '.join(sorted(self.hosts))}; see --allowed-hosts)")
        path = scope.get("path", "")
        if self.token and not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)) and not self._authorised(headers):
            return await refuse(send, 401, "missing or wrong token: send 'Authorization: Bearer <token>'",
                                [(b"www-authenticate", b'Bearer realm="cxrlab"')])
        declared = headers.get(b"content-length")
        if declared == b"0" or (declared is None and b"transfer-encoding" not in headers):
            return await self.app(scope, receive, send)  # no body: nothing to count or hold
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await refuse(send, 413, self._too_large(int(declared)))
        if self.uploads >= self.max_uploads:
            return await refuse(send, 503, f"server busy: {self.max_uploads} uploads in progress; retry later",
                                [(b"retry-after", b"5")])
        self.uploads += 1
        spool = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY, dir=self.spool_dir)
        try:
            outcome = await self._receive_body(receive, spool)
            if outcome is None:
                return None  # the client went away
            if isinstance(outcome, tuple):
                return await refuse(send, *outcome)
            return await self.app(scope, self._replay(spool, outcome, receive), send)
        finally:
            spool.close()
            self.uploads -= 1

    def _authorised(self, headers: dict) -> bool:
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        # compare_digest: the time taken does not say how much of a guess was right
        return scheme.lower() == b"bearer" and hmac.compare_digest(value.strip(), self.token)

    async def _receive_body(self, receive, spool):
        """The body's size once it is all in ``spool``; (status, detail) to refuse it; None on disconnect."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.read_timeout
        size, more = 0, True
        while more:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                return 408, f"request body not received within {self.read_timeout:g} s"
            if message["type"] == "http.disconnect":
                return None
            body = message.get("body", b"")
            size += len(body)
            more = message.get("more_body", False)
            if size > self.limit:
                await self._drain(receive, more, loop)
                return 413, self._too_large(size, complete=not more)
            spool.write(body)
        spool.seek(0)
        return size

    @staticmethod
    async def _drain(receive, more: bool, loop) -> None:
        """Read (and drop) a little of what follows, so that a client still sending sees the answer."""
        drained, stop = 0, loop.time() + DRAIN_SECONDS
        while more and drained < DRAIN_BYTES and loop.time() < stop:
            try:
                message = await asyncio.wait_for(receive(), max(0.0, stop - loop.time()))
            except asyncio.TimeoutError:
                return
            drained += len(message.get("body", b""))
            more = message.get("type") == "http.request" and message.get("more_body", False)

    def _too_large(self, size: int, complete: bool = True) -> str:
        size_text = f"{size:,} bytes" if complete else f"over {size:,} bytes (not read further)"
        return f"request body of {size_text} exceeds the limit of {self.limit:,} bytes"

    @staticmethod
    def _replay(spool, size: int, receive):
        """The app's ``receive``: the spooled body in chunks, then the real one (for the disconnect)."""
        async def replay():
            if spool.closed:
                return await receive()
            chunk = spool.read(REPLAY_CHUNK)
            more = spool.tell() < size
            if not more:
                spool.close()  # the app has it all: the file goes now, not after the answer
            return {"type": "http.request", "body": chunk, "more_body": more}

        return replay

    @staticmethod
    def _with_headers(scope, send):
        cacheable = scope.get("path", "").startswith(OPEN_PREFIXES)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                present = {name.lower() for name, _ in message.get("headers", [])}
                extra = [h for h in SECURITY_HEADERS if h[0] not in present]
                if not cacheable and b"cache-control" not in present:  # answers about images: not kept
                    extra.append((b"cache-control", b"no-store"))
                message = {**message, "headers": list(message.get("headers", [])) + extra}
            await send(message)

        return send_with_headers


async def refuse(send, status: int, detail: str, headers=()) -> None:
    """A JSON error answer that closes the connection (its body, if any, is left unread)."""
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close"), *headers]})
    await send({"type": "http.response.body", "body": body})
