"""A minimal asyncio + uvloop length-prefixed TCP server: the Python reference.

Frames are a 4-byte big-endian length then the payload, as on IMServer's TCP
transport. Two behaviours (``--mode``):

- ``echo``: every frame is written back to its sender. The frames found in one read
  are written back with one ``write`` (one write per socket per loop iteration).
- ``fanout``: every frame is written to every *other* connected socket. Frames read
  in one loop iteration are queued and flushed once, at the end of the iteration
  (``call_soon``): each subscriber gets one ``write`` of the same joined bytes, like
  IMServer's hub (encode once, coalesce per session per iteration). Then each
  publisher gets an ack: a 4-byte frame holding the number of its frames flushed
  (IMServer acks each send), so a publisher can keep a window in flight. A subscriber whose
  transport buffer passes its high-water mark pauses reading from every publisher
  until it drains, so the server never buffers without bound.

Frames are parsed one by one (their lengths checked) but not decoded: this is the
floor under any server that must also decode, authorise and store them.

    python -m benchmarks.reference.echo_server --port 9000 --mode fanout
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from typing import Final

HEADER: Final = 4
ACK_HEAD: Final = (4).to_bytes(4, "big")
MAX_FRAME: Final = 1 << 20


class _Server:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.conns: dict[_Conn, None] = {}
        self.pending: list[tuple[_Conn, bytes, int]] = []
        self.flush_scheduled = False
        self.paused: set[_Conn] = set()
        self.publishers: set[_Conn] = set()
        self.loop = asyncio.get_running_loop()

    def publish(self, sender: _Conn, data: bytes, frames: int) -> None:
        self.pending.append((sender, data, frames))
        self.publishers.add(sender)
        if self.paused:
            sender.pause()
        if not self.flush_scheduled:
            self.flush_scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.flush_scheduled = False
        pending, self.pending = self.pending, []
        if not pending:
            return
        acks: dict[_Conn, int] = {}
        for sender, _, frames in pending:
            acks[sender] = acks.get(sender, 0) + frames
        if len(acks) == 1:
            (sender,) = acks
            blob = b"".join(d for _, d, _ in pending)
            for conn in self.conns:
                if conn is not sender:
                    conn.write(blob)
        else:
            for conn in self.conns:
                mine = [d for s, d, _ in pending if s is not conn]
                if mine:
                    conn.write(b"".join(mine))
        for sender, frames in acks.items():
            sender.write(ACK_HEAD + frames.to_bytes(4, "big"))

    def paused_writing(self, conn: _Conn) -> None:
        self.paused.add(conn)
        for pub in self.publishers:
            pub.pause()

    def resumed_writing(self, conn: _Conn) -> None:
        self.paused.discard(conn)
        if not self.paused:
            for pub in self.publishers:
                pub.resume()

    def gone(self, conn: _Conn) -> None:
        self.conns.pop(conn, None)
        self.publishers.discard(conn)
        self.resumed_writing(conn)


class _Conn(asyncio.Protocol):
    def __init__(self, server: _Server) -> None:
        self.server = server
        self.echo = server.mode == "echo"
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.reading = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.server.conns[self] = None

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        size = len(buf)
        pos = 0
        frames = 0
        while size - pos >= HEADER:
            n = int.from_bytes(buf[pos : pos + HEADER], "big")
            if n > MAX_FRAME:
                assert self.transport is not None
                self.transport.close()
                return
            if size - pos < HEADER + n:
                break
            pos += HEADER + n
            frames += 1
        if not pos:
            return
        data = bytes(buf[:pos])
        del buf[:pos]
        if self.echo:
            assert self.transport is not None
            self.transport.write(data)
        else:
            self.server.publish(self, data, frames)

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def pause(self) -> None:
        if self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = False
            self.transport.pause_reading()

    def resume(self) -> None:
        if not self.reading and self.transport is not None and not self.transport.is_closing():
            self.reading = True
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.server.paused_writing(self)

    def resume_writing(self) -> None:
        self.server.resumed_writing(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.gone(self)


async def serve(host: str, port: int, mode: str) -> None:
    """Serve until SIGTERM or SIGINT."""
    loop = asyncio.get_running_loop()
    state = _Server(mode)
    server = await loop.create_server(lambda: _Conn(state), host, port, backlog=4096)
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"listening on {host}:{port} ({mode})", flush=True)
    await stop.wait()
    server.close()
    for conn in list(state.conns):
        if conn.transport is not None:
            conn.transport.abort()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(server.wait_closed(), 2)


def main(argv: list[str] | None = None) -> int:
    """``python -m benchmarks.reference.echo_server --port N --mode echo|fanout``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--mode", choices=("echo", "fanout"), default="echo")
    p.add_argument("--no-uvloop", action="store_true", help="plain asyncio")
    args = p.parse_args(argv)
    factory = None
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.mode))
    return 0


if __name__ == "__main__":
    sys.exit(main())
