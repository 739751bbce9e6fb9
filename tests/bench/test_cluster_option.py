"""``python -m benchmarks dm --cluster``: the machinery of the distributed-mode comparison.

The pieces first: a scenario's settings reach the cluster's processes through
``IMSERVER_*`` variables, CPU per operation is summed per service and per backing
server, and medians are taken figure by figure. Then one tiny run against an
embedded server and the local cluster (etcd, HAProxy, PostgreSQL, Redis, RabbitMQ):
both sides report their figures, every IMServer service and every backing server has
a CPU figure, and the cluster's prefix leaves no Redis key behind. No timing
assertions. A missing part of the cluster skips (fails under ``CI=true``).
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from etcd_server import require_etcd

from benchmarks import databases, deployment, distributed, harness
from imserver.cluster import haproxy
from imserver.testing import redis as redis_testing
from imserver.utils.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300.0


def test_settings_reach_the_processes_through_the_environment() -> None:
    env = deployment.environment_of(
        {
            "limits": {"rate_per_s": 1e9, "rate_burst": 1_000_000, "heartbeat": 3600},
            "auth": {"argon2_memory_kib": 1024},
            "log_level": "warning",
        }
    )
    assert env["IMSERVER_LIMITS__RATE_BURST"] == "1000000"
    config = load_config(None, environ=env)
    assert config.limits.rate_per_s == 1e9
    assert config.limits.rate_burst == 1_000_000
    assert config.limits.heartbeat == 3600
    assert config.auth.argon2_memory_kib == 1024
    assert config.log_level == "warning"


def _snapshot(procs: dict[int, float], backing: dict[str, float]) -> harness.CpuSnapshot:
    return harness.CpuSnapshot(0.0, procs, {}, {}, 0.0, 0.0, 0.0, backing)


def test_cpu_per_op_sums_processes_by_service() -> None:
    target = deployment.Target(
        kind="cluster",
        http_url="http://127.0.0.1:1",
        gateways=[deployment.Gateway(1, 2), deployment.Gateway(3, 4)],
        processes={
            "gateway-1": 11,
            "gateway-2": 12,
            "message-1": 21,
            "message-2": 22,
            "user-1": 31,
        },
        backing=deployment.Backing(None, redis_pid=None, rabbitmq_pid=None),
    )
    a = _snapshot(
        {11: 1.0, 12: 1.0, 21: 5.0, 22: 5.0, 31: 0.0}, {"ours": 1.0, "redis": 2.0, "rabbitmq": 3.0}
    )
    b = _snapshot(
        {11: 1.5, 12: 1.25, 21: 6.0, 22: 5.5, 31: 0.25},
        {"ours": 1.5, "redis": 2.1, "rabbitmq": 3.2},
    )
    got = deployment.cpu_per_op(a, b, target, 1000)
    assert got["ops"] == 1000
    assert got["gateway_us"] == pytest.approx(750.0)
    assert got["services_us"] == pytest.approx({"gateway": 750.0, "message": 1500.0, "user": 250.0})
    assert got["imserver_us"] == pytest.approx(2500.0)
    assert got["backing_us"] == pytest.approx(
        {"postgresql": 500.0, "redis": 100.0, "rabbitmq": 200.0}
    )
    assert deployment.cpu_per_op(a, b, target, 0) == {}
    assert deployment.profiled(target) == {"gateway-1": 11, "message-1": 21, "user-1": 31}


def test_medians_are_taken_figure_by_figure() -> None:
    runs = [
        {"msgs_per_s": 10.0, "per_op": {"imserver_us": 3.0, "services_us": {"user": 1.0}}},
        {"msgs_per_s": 30.0, "per_op": {"imserver_us": 1.0, "services_us": {"user": None}}},
        {"msgs_per_s": 20.0, "per_op": {"imserver_us": 2.0, "services_us": {"user": 5.0}}},
    ]
    assert distributed.medians(runs) == {
        "msgs_per_s": 20.0,
        "per_op.imserver_us": 2.0,
        "per_op.services_us.user": 3.0,
    }


def _require_cluster_parts() -> None:
    require_etcd()
    missing = []
    if haproxy.binary() is None:
        missing.append("haproxy is not installed")
    why = redis_testing.reachable(deployment.REDIS_URL)
    if why is not None:
        missing.append(why)
    try:
        databases.run_blocking(databases.admin("postgresql", ["SELECT 1"]))
    except (OSError, TimeoutError, ImportError) as exc:
        missing.append(f"postgresql not reachable: {exc}")
    try:
        asyncio.run(_rabbitmq_answers())
    except (OSError, TimeoutError) as exc:
        missing.append(f"rabbitmq not reachable: {exc}")
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail("; ".join(missing) + " (CI=true: the cluster benchmark must run)")
        pytest.skip("; ".join(missing))


async def _rabbitmq_answers() -> None:
    import aio_pika

    connection = await aio_pika.connect(deployment.RABBITMQ_URL, timeout=5)
    await connection.close()


def _bench_keys() -> set[bytes]:
    import redis

    client = redis.Redis.from_url(deployment.REDIS_URL)
    try:
        return set(client.scan_iter(match="imsbench*", count=1000))
    finally:
        client.close()


def test_dm_against_the_cluster_reports_both_sides(tmp_path: Path) -> None:
    _require_cluster_parts()
    keys_before = _bench_keys()
    out = tmp_path / "dm-cluster.json"
    cmd = [
        sys.executable, "-m", "benchmarks", "dm", "--cluster", "--rounds", "1",
        "--pairs", "2", "--window", "2", "--duration", "1", "--warmup", "0.5",
        "--no-progress", "--results-file", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "| IMServer CPU per message, all processes (µs) |" in proc.stdout
    assert "target: summed IMServer CPU per message ≤ 3× embedded" in proc.stdout
    doc = json.loads(out.read_text())
    assert doc["scenario"] == "dm --cluster"
    embedded, cluster = doc["runs"]["embedded"], doc["runs"]["cluster"]
    assert len(embedded) == len(cluster) == 1
    for run in (embedded[0], cluster[0]):
        assert run["msgs_per_s"] > 0
        assert run["per_op"]["imserver_us"] > 0
    assert set(embedded[0]["per_op"]["services_us"]) == {"server"}
    services = cluster[0]["per_op"]["services_us"]
    assert set(services) == {"gateway", "message", "user", "room", "file", "notification"}
    assert services["gateway"] > 0 and services["message"] > 0
    assert cluster[0]["per_op"]["gateway_us"] == services["gateway"]
    visible = {"postgresql"} | {
        name
        for name, port in (("redis", deployment.REDIS_PORT), ("rabbitmq", deployment.RABBITMQ_PORT))
        if deployment.listener_pid(port) is not None
    }
    assert set(cluster[0]["per_op"]["backing_us"]) == visible
    # The cluster's prefix is gone from Redis (other runs' keys may come and go).
    assert _bench_keys() <= keys_before
