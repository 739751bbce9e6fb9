"""asyncio I/O only: the listeners, the WebSocket transport and the TCP transport.

These modules move bytes between sockets and the connections of a
:class:`~imserver.network.handler.ConnectionHandler` (the gateway implements it); all
protocol decisions are made in ``protocol`` and by the handler. Nothing here imports a
service.
"""
