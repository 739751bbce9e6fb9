"""Scenario ``push``: the push pipeline, from a committed message to the webhook request.

A real server runs with ``[push.webhook]`` pointing at a local receiver: an aiohttp
server in a process of its own (so the server's CPU is measured apart from it) that
checks every request's HMAC signature with the recipe of docs/push.md, records when
it arrived, and counts repeated ``Idempotency-Key`` s. ``--recipients`` users each log
in once, register their device with ``push.register {provider: "webhook", target:
{token}}`` and disconnect: they are offline, so every message to them is due a push.
``--senders`` online users send them direct messages, sender ``s``'s ``k``-th message
going to recipient ``(s * recipients / senders + k) mod recipients``: each sender
goes round every recipient, starting at its own offset, so there are senders ×
recipients conversations and one gets its next message only after ``recipients``
messages of its sender: while the pipeline keeps up, long after its previous push
went out (each message is one push).

``push.collapse_delay`` is 0: with a delay, the messages of one conversation within
it would fold into one push and the figure would count bursts, not pushes. A message
that still finds its conversation's push waiting folds into it all the same; the
receiver sums each push's ``count`` so that every acked message is accounted for, and
the folded messages are reported.

Latency: each message's body is its send time (wall clock, the same machine as the
receiver); the webhook body's preview carries it to the receiver, which subtracts it
from the request's arrival. So the figure is **send → webhook request**: the client's
send, the commit, the notification service's ingest and queue, the signed POST. It
includes the commit and so bounds commit → request from above (the ack comes after
the commit; the send is before it).

Measured: pushes/s (requests received in the measured interval, after ``--warmup``),
the latency percentiles, server CPU per push beside the throughput, and the
receiver's CPU. Verified: every signature valid, no repeated key, and every acked
message counted in exactly one push (within ``--drain-timeout``). Without ``--rate``
the senders go at full speed (``--window`` sends in flight each); with it, the
messages are paced at that many per second in total. ``--max-messages`` stops the
senders early (the test suite's tiny run, whose queue must drain in its timeout).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import hmac
import json
import multiprocessing
import time
from multiprocessing.connection import Connection
from typing import Any, Final

from benchmarks import harness
from imserver.client import Client
from imserver.testing.accounts import bulk_register
from imserver.utils.config import AuthConfig

SCENARIO: Final = "push"
SECRET: Final = "bench-webhook-secret"
TOLERANCE: Final = 300
AUTH: Final = AuthConfig(argon2_memory_kib=1024, argon2_time_cost=1)
SERVER_CONFIG: Final[dict[str, Any]] = {
    "limits": {"rate_per_s": 1e9, "rate_burst": 1_000_000},
    "auth": {
        "argon2_memory_kib": AUTH.argon2_memory_kib,
        "argon2_time_cost": AUTH.argon2_time_cost,
    },
    "push": {"collapse_delay": 0, "webpush": {"enabled": False}},
}


def default_procs() -> int:
    """One client process: the senders run in the parent, the receiver in its own."""
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``push`` sub-command's options."""
    parser.add_argument(
        "--recipients", type=int, default=2000, help="offline users with a webhook (2,000)"
    )
    parser.add_argument("--senders", type=int, default=20, help="online senders (default 20)")
    parser.add_argument(
        "--window", type=int, default=16, help="sends in flight per sender at full speed (16)"
    )
    parser.add_argument(
        "--rate", type=float, default=0.0, help="messages/s in total; 0: full speed (default)"
    )
    parser.add_argument(
        "--max-messages",
        type=int,
        default=0,
        help="stop sending after this many messages; 0: no cap (default)",
    )


# --- the receiver (its own process) ----------------------------------------------------


def verify(secret: bytes, timestamp: str, signature: str, body: bytes, now: float) -> bool:
    """docs/push.md's recipe: True when ``body`` was signed with ``secret`` at ``timestamp``."""
    if not (timestamp.isascii() and timestamp.isdigit()):
        return False
    if abs(now - int(timestamp)) > TOLERANCE:
        return False
    mac = hmac.new(secret, timestamp.encode() + b"." + body, hashlib.sha256)
    return hmac.compare_digest(signature.encode(), ("v1=" + mac.hexdigest()).encode())


def _receiver_main(conn: Connection) -> None:
    """Serve the webhook on a free port; send the port, then the records when asked."""
    from aiohttp import web

    arrivals: list[tuple[float, float, int]] = []  # (arrival, sent, count)
    keys: set[str] = set()
    counts = {"repeats": 0, "bad_signature": 0}

    async def push(request: web.Request) -> web.Response:
        body = await request.read()
        now = time.time()
        headers = request.headers
        if not verify(
            SECRET.encode(),
            headers.get("X-IMServer-Timestamp", ""),
            headers.get("X-IMServer-Signature", ""),
            body,
            now,
        ):
            counts["bad_signature"] += 1
            return web.Response(status=401)
        key = headers.get("Idempotency-Key", "")
        if key in keys:
            counts["repeats"] += 1
            return web.Response(status=200)
        keys.add(key)
        doc = json.loads(body)
        try:
            sent = float(doc["body"])
        except ValueError:
            sent = float("nan")
        arrivals.append((now, sent, int(doc["count"])))
        return web.Response(status=204)

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/push", push)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        conn.send(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
        loop = asyncio.get_running_loop()
        while True:
            ask = await loop.run_in_executor(None, conn.recv)
            conn.send({"arrivals": arrivals, **counts})
            if ask == "stop":
                break
        await runner.cleanup()

    harness.run_async(main())


class Receiver:
    """The receiver process: start, ask for what it recorded, stop."""

    def __init__(self) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_receiver_main, args=(child,), daemon=True)
        self.port = 0

    def __enter__(self) -> Receiver:
        self._proc.start()
        if not self._conn.poll(30):
            raise RuntimeError("the webhook receiver did not start")
        self.port = int(self._conn.recv())
        return self

    @property
    def pid(self) -> int:
        """The receiver's process id."""
        assert self._proc.pid is not None
        return self._proc.pid

    def records(self, *, stop: bool = False) -> dict[str, Any]:
        """Every arrival so far and the counts of repeats and bad signatures."""
        self._conn.send("stop" if stop else "records")
        if not self._conn.poll(60):
            raise RuntimeError("the webhook receiver does not answer")
        out: dict[str, Any] = self._conn.recv()
        return out

    def __exit__(self, *exc: object) -> None:
        self._proc.join(5)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)


# --- the senders ---------------------------------------------------------------------


async def _recipients_offline(server: harness.ServerProcess, names: list[str]) -> None:
    """Each recipient logs in, registers a webhook for its device and disconnects."""
    sem = asyncio.Semaphore(16)

    async def one(n: int, name: str) -> None:
        async with sem:
            c = await Client.connect(server.ws_url)
            try:
                await c.login(name, harness.PASSWORD, device=f"dev{n}")
                await c.request(
                    "push.register", {"provider": "webhook", "target": {"token": f"t{n}"}}
                )
            finally:
                await c.close()

    await asyncio.gather(*(one(n, name) for n, name in enumerate(names)))


async def _send(
    server: harness.ServerProcess,
    senders: list[str],
    recipient_ids: list[str],
    args: argparse.Namespace,
    t_end: float,
) -> dict[str, int]:
    """Send until ``t_end`` (wall clock) or ``--max-messages``; returns the acked and
    failed sends."""
    clients = []
    for name in senders:
        c = await Client.connect(server.ws_url)
        await c.login(name, harness.PASSWORD)
        clients.append(c)
    tally = {"acked": 0, "errors": 0, "started": 0}
    cap = args.max_messages or float("inf")
    n_s, n_r = len(clients), len(recipient_ids)

    async def send(c: Client, k: int, s: int) -> None:
        to = recipient_ids[(s * n_r // n_s + k) % n_r]
        tally["started"] += 1
        try:
            await c.send_message(Client.direct_conv(c.user_id, to), f"{time.time():.6f}")
            tally["acked"] += 1
        except Exception:
            tally["errors"] += 1

    async def full_speed(s: int, c: Client, lane: int) -> None:
        k = lane
        while time.time() < t_end and tally["started"] < cap:
            await send(c, k, s)
            k += args.window

    async def paced(s: int, c: Client) -> None:
        period = n_s / args.rate
        start = time.monotonic() + s * period / n_s
        pending: set[asyncio.Task[None]] = set()
        k = 0
        while time.time() < t_end and tally["started"] < cap:
            delay = start + k * period - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(c, k, s))
            pending.add(task)
            task.add_done_callback(pending.discard)
            k += 1
        if pending:
            await asyncio.wait(pending)

    try:
        if args.rate > 0:
            await asyncio.gather(*(paced(s, c) for s, c in enumerate(clients)))
        else:
            await asyncio.gather(
                *(
                    full_speed(s, c, lane)
                    for s, c in enumerate(clients)
                    for lane in range(args.window)
                )
            )
    finally:
        await asyncio.gather(*(c.close() for c in clients))
    return tally


async def _measure(
    server: harness.ServerProcess,
    receiver: Receiver,
    recipients: list[str],
    senders: list[str],
    recipient_ids: list[str],
    args: argparse.Namespace,
) -> dict[str, Any]:
    await _recipients_offline(server, recipients)
    t0 = time.time()
    t_measure, t_end = t0 + args.warmup, t0 + args.warmup + args.duration
    cpu: dict[str, float] = {}

    async def sample_cpu() -> None:
        await asyncio.sleep(max(0.0, t_measure - time.time()))
        cpu["server0"] = harness.proc_cpu_seconds(server.pid)
        cpu["receiver0"] = harness.proc_cpu_seconds(receiver.pid)
        await asyncio.sleep(max(0.0, t_end - time.time()))
        cpu["server1"] = harness.proc_cpu_seconds(server.pid)
        cpu["receiver1"] = harness.proc_cpu_seconds(receiver.pid)

    async def profile() -> dict[str, Any] | None:
        if not args.profile:
            return None
        await asyncio.sleep(max(0.0, t_measure - time.time()))
        stamp = harness.timestamp()
        path = harness.RESULTS_DIR / f"{SCENARIO}-{stamp}-server.speedscope.json"
        profiler = harness.PySpy(server.pid, args.duration, path)
        profiler.start()
        return await asyncio.to_thread(profiler.summary)

    sampler = asyncio.create_task(sample_cpu())
    profiler = asyncio.create_task(profile())
    tally = await _send(server, senders, recipient_ids, args, t_end)
    await sampler
    summary = await profiler
    deadline = time.monotonic() + args.drain_timeout
    while True:
        rec = await asyncio.to_thread(receiver.records)
        covered = sum(a[2] for a in rec["arrivals"])
        if covered >= tally["acked"] or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.25)
    return {
        "tally": tally,
        "records": rec,
        "cpu": cpu,
        "t_measure": t_measure,
        "t_end": t_end,
        "profile": summary,
    }


def run(args: argparse.Namespace) -> int:
    """Run the scenario; returns the exit status (0 = ran and verified)."""
    if args.recipients < 1 or args.senders < 1 or args.window < 1 or args.rate < 0:
        raise SystemExit("--recipients, --senders and --window must be positive, --rate >= 0")
    stamp = harness.timestamp()
    mode = f"@{args.rate:,.0f}/s" if args.rate else "full speed"
    report = harness.Report(title=f"push: message to webhook request, {mode} ({stamp})")
    recipients = [f"bench_r{n:06d}" for n in range(args.recipients)]
    senders = [f"bench_s{n:04d}" for n in range(args.senders)]
    with Receiver() as receiver:
        webhook = {"url": f"http://127.0.0.1:{receiver.port}/push", "secret": SECRET}
        config = harness.merge_config(
            harness.merge_config(SERVER_CONFIG, {"push": {"webhook": webhook}}),
            harness.parse_settings(args.set),
        )
        server = harness.ServerProcess(config, keep_dir=args.keep_data)
        try:
            server.data_dir.mkdir(parents=True, exist_ok=True)
            created = asyncio.run(
                bulk_register(server.data_dir, recipients + senders, harness.PASSWORD, AUTH)
            )
            recipient_ids = [u.id for u in created[: args.recipients]]
            with server:
                harness.console.print(f"[dim]server pid {server.pid}, receiver pid {receiver.pid}")
                result = harness.run_async(
                    _measure(server, receiver, recipients, senders, recipient_ids, args),
                    uvloop=not args.no_uvloop,
                )
                code = server.stop()
        finally:
            server.cleanup()
        receiver.records(stop=True)
    if code != 0:
        report.failures.append(f"server exited with code {code}")
    rec, tally, cpu = result["records"], result["tally"], result["cpu"]
    arrivals = rec["arrivals"]
    in_window = [a for a in arrivals if result["t_measure"] <= a[0] < result["t_end"]]
    pushes_per_s = len(in_window) / args.duration
    covered = sum(a[2] for a in arrivals)
    folded = covered - len(arrivals)
    latency = harness.latency_summary(int((a[0] - a[1]) * 1e9) for a in in_window)
    server_cpu = cpu["server1"] - cpu["server0"]
    receiver_cpu = cpu["receiver1"] - cpu["receiver0"]
    per_push_us = 1e6 * server_cpu / len(in_window) if in_window else float("nan")
    if rec["repeats"]:
        report.failures.append(f"{rec['repeats']} repeated Idempotency-Keys")
    if rec["bad_signature"]:
        report.failures.append(f"{rec['bad_signature']} requests with a bad signature")
    if tally["errors"]:
        report.failures.append(f"{tally['errors']} sends refused or timed out")
    if covered != tally["acked"]:
        report.failures.append(
            f"{tally['acked']:,} messages acked, {covered:,} counted in pushes received"
        )
    report.add("pushes/s (requests received)", f"{pushes_per_s:,.0f}")
    report.add(
        "send → request ms",
        f"p50 {latency.get('p50_ms', float('nan')):.1f}, "
        f"p99 {latency.get('p99_ms', float('nan')):.1f}, max {latency.get('max_ms', 0):.1f}",
    )
    report.add(
        "server CPU µs/push",
        f"{per_push_us:.0f} ({100 * server_cpu / args.duration:.0f}% of a core)",
    )
    report.add("receiver CPU % of a core", f"{100 * receiver_cpu / args.duration:.0f}")
    report.add("messages acked / pushes", f"{tally['acked']:,} / {len(arrivals):,}")
    report.add("folded into a waiting push", f"{folded:,}")
    report.add("repeats, bad signatures", f"{rec['repeats']}, {rec['bad_signature']}")
    report.config.append(("recipients (offline, webhook)", f"{args.recipients:,}"))
    report.config.append(("senders", f"{args.senders} × window {args.window}"))
    report.config.append(("rate", mode))
    report.config.append(("push.collapse_delay", "0"))
    out = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "results": {
            "pushes_per_s": pushes_per_s,
            "latency": latency,
            "server_cpu_s": server_cpu,
            "server_us_per_push": per_push_us,
            "server_cpu_pct": 100 * server_cpu / args.duration,
            "receiver_cpu_pct": 100 * receiver_cpu / args.duration,
            "acked": tally["acked"],
            "send_errors": tally["errors"],
            "pushes": len(arrivals),
            "folded": folded,
            "repeats": rec["repeats"],
            "bad_signatures": rec["bad_signature"],
        },
    }
    profile = result["profile"]
    if profile is not None:
        out["profile"] = profile
        report.notes.append("py-spy sampled the server during the measured interval (costs CPU)")
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report, profile if profile and profile.get("samples") else None)
    if profile and profile.get("error"):
        harness.console.print(f"py-spy failed: {profile['error']}")
    harness.console.print(f"[dim]results: {path}[/dim]")
    return 1 if report.failures else 0
