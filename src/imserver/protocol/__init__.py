"""The wire protocol, sans-I/O: framing, codecs, typed ops and events, validation.

Nothing in this package imports asyncio or socket: bytes go in, objects come out.
"""
