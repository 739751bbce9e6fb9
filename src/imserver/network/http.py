"""Generic HTTP plumbing for aiohttp: the runner of an application and its logger.

The routes themselves (the HTTP API) belong to the gateway; this module knows nothing
of them.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError


class RequestLog(logging.LoggerAdapter):  # type: ignore[type-arg]
    """The logger of aiohttp's request handler (``AppRunner(logger=...)``).

    A request the client malformed (a bad method, a header line too long,
    ``Transfer-Encoding`` with ``Content-Length``) makes aiohttp's parser raise
    :class:`HttpProcessingError`; aiohttp answers it ``400`` and logs an ``ERROR``
    with a traceback, so any client could fill the log with tracebacks at will. Such
    records become ``DEBUG`` (aiohttp does the same for a bad method on a fresh
    connection); a failure of the server's own keeps its ``ERROR``.
    """

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kw: Any) -> None:
        if isinstance(exc_info, HttpProcessingError):
            self.debug(msg, *args, exc_info=exc_info, **kw)
        else:
            self.error(msg, *args, exc_info=exc_info, **kw)


def app_runner(app: web.Application) -> web.AppRunner:
    """An aiohttp runner for ``app`` that leaves signals to the caller, writes no access
    log and logs malformed requests through :class:`RequestLog`."""
    return web.AppRunner(app, handle_signals=False, access_log=None, logger=RequestLog())
