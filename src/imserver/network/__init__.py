"""asyncio I/O only: the WebSocket + HTTP server (aiohttp) and the TCP server.

These modules move bytes between sockets and :class:`~imserver.services.gateway.session.Session`
objects; all protocol decisions are made in ``protocol`` and ``core``.
"""
