"""Scenario ``files``: upload and download throughput of one file over HTTP.

Starts a server (local blob store by default; ``--set files.backend="s3"`` and the
``files.s3_*`` settings point it at an S3 endpoint), registers two users, then uploads
``--repeat`` files of ``--size-mib`` MiB of random bytes (distinct content, so no
upload is deduplicated) one after another into their direct conversation, and downloads
each one back. Prints MB/s (10^6 bytes per second) of each direction, over the wall
time of the requests, and checks every download's SHA-256 against the upload's.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import time
from typing import Any, Final

import aiohttp

from benchmarks import harness
from imserver.client import Client

SCENARIO: Final = "files"
MIB: Final = 1024 * 1024
SERVER_CONFIG: Final[dict[str, Any]] = {
    "files": {"max_size": 64 * MIB, "quota_per_user": 0},
    "auth": {"argon2_memory_kib": 1024, "argon2_time_cost": 1},
}


def default_procs() -> int:
    """One client process: this scenario runs in the parent."""
    return 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``files`` sub-command's options."""
    parser.add_argument("--size-mib", type=float, default=10.0, help="file size (default 10)")
    parser.add_argument(
        "--repeat", type=int, default=5, help="files uploaded and downloaded (default 5)"
    )


async def _measure(http_url: str, size: int, repeat: int) -> dict[str, Any]:
    alice, bob = await harness.provision_users(http_url, 2, prefix="files")
    conv = Client.direct_conv(alice.user_id, bob.user_id)
    up_s: list[float] = []
    down_s: list[float] = []
    mismatches = 0
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        for _ in range(repeat):
            data = os.urandom(size)
            t0 = time.perf_counter()
            async with session.post(
                f"{http_url}/api/v1/files",
                params={"conv": conv, "name": "bench.bin"},
                data=data,
                headers={"Authorization": f"Bearer {alice.token}"},
            ) as resp:
                body = await resp.json()
                if resp.status != 200:
                    raise RuntimeError(f"upload answered {resp.status}: {body}")
            up_s.append(time.perf_counter() - t0)
            info = body["file"]
            digest = hashlib.sha256()
            t0 = time.perf_counter()
            async with session.get(
                http_url + info["url"], headers={"Authorization": f"Bearer {bob.token}"}
            ) as resp:
                if resp.status != 200:
                    raise RuntimeError(f"download answered {resp.status}")
                async for chunk in resp.content.iter_chunked(1 << 20):
                    digest.update(chunk)
            down_s.append(time.perf_counter() - t0)
            if digest.hexdigest() != info["sha256"]:
                mismatches += 1
    return {"upload_s": up_s, "download_s": down_s, "mismatches": mismatches}


def _mb_s(size: int, seconds: list[float]) -> tuple[float, float]:
    """(MB/s over the total time, MB/s of the median request)."""
    total = size * len(seconds) / sum(seconds) / 1e6
    return total, size / statistics.median(seconds) / 1e6


def run(args: argparse.Namespace) -> int:
    """Run the scenario; returns the exit status (0 = ran and verified)."""
    if args.size_mib <= 0 or args.repeat < 1:
        raise SystemExit("--size-mib and --repeat must be positive")
    size = int(args.size_mib * MIB)
    config = harness.merge_config(SERVER_CONFIG, harness.parse_settings(args.set))
    stamp = harness.timestamp()
    report = harness.Report(title=f"files: upload/download of {args.size_mib:g} MiB ({stamp})")
    with harness.ServerProcess(config, keep_dir=args.keep_data) as server:
        harness.console.print(f"[dim]server pid {server.pid} on {server.http_url}[/dim]")
        result = harness.run_async(
            _measure(server.http_url, size, args.repeat), uvloop=not args.no_uvloop
        )
        code = server.stop()
    if code != 0:
        report.failures.append(f"server exited with code {code}")
    if result["mismatches"]:
        report.failures.append(f"{result['mismatches']} downloads did not match their upload")
    up_total, up_median = _mb_s(size, result["upload_s"])
    down_total, down_median = _mb_s(size, result["download_s"])
    report.add("upload MB/s", f"{up_total:.1f} (median request {up_median:.1f})")
    report.add("download MB/s", f"{down_total:.1f} (median request {down_median:.1f})")
    report.add("files", f"{args.repeat} x {size} bytes")
    report.config.append(("backend", str(config.get("files", {}).get("backend", "local"))))
    out = {
        "scenario": SCENARIO,
        "timestamp": stamp,
        "environment": harness.environment(),
        "options": {k: v for k, v in vars(args).items() if k != "func"},
        "size": size,
        "upload_mb_s": up_total,
        "download_mb_s": down_total,
        **result,
    }
    path = harness.write_results(SCENARIO, out, stamp)
    harness.print_report(report)
    harness.console.print(f"[dim]results: {path}[/dim]")
    return 1 if report.failures else 0
