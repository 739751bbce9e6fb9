"""A real HTTP receiver on 127.0.0.1 for the push provider tests: an aiohttp server
whose one handler answers as the test sets it (a status, a hang), after checking what
the test wants checked."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from aiohttp import web

Answer = int | str
"""A status, or ``"hang"``: no answer until the receiver closes."""
Check = Callable[[web.Request, bytes, Answer], Awaitable[web.Response | None]]
"""Looks at a request and the answer planned for it: a response to answer instead (a
failed verification, a repeat), or None for the planned answer."""


@dataclass
class Receiver:
    """What the server got and how it will answer."""

    url: str
    """Base URL, ``http://127.0.0.1:<port>``."""
    requests: list[tuple[web.Request, bytes]] = field(default_factory=list)
    answers: list[Answer] = field(default_factory=list)
    """Planned answers, one per request; then ``default``."""
    default: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    """Headers of every non-2xx answer (``Retry-After``)."""
    peers: list[int] = field(default_factory=list)
    """The client port of each request (one port: one reused connection)."""
    released: asyncio.Event = field(default_factory=asyncio.Event)


@asynccontextmanager
async def serve(check: Check | None = None) -> AsyncIterator[Receiver]:
    """A receiver on a free port of 127.0.0.1, every path answered by one handler."""
    receiver = Receiver(url="")

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        receiver.requests.append((request, body))
        peer = request.transport.get_extra_info("peername") if request.transport else None
        receiver.peers.append(peer[1] if peer else -1)
        answer = receiver.answers.pop(0) if receiver.answers else receiver.default
        if check is not None:
            instead = await check(request, body, answer)
            if instead is not None:
                return instead
        if answer == "hang":
            await receiver.released.wait()
            return web.Response(status=200)
        assert isinstance(answer, int)
        headers = receiver.headers if answer >= 300 else {}
        return web.Response(status=answer, text=f"answer {answer}", headers=headers)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, shutdown_timeout=1.0)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    receiver.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield receiver
    finally:
        receiver.released.set()
        await runner.cleanup()
