"""The suite's results table: every run's status is shown, and a run that failed its
own checks never meets a target (``benchmarks/suite.py``). No scenario runs here."""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.suite import (
    Row,
    Step,
    StepResult,
    Target,
    build_table,
    markdown_table,
    step_status,
)

# Figures that meet every target of their rows.
AUTH_STORM: dict[str, Any] = {
    "results": {"auths_per_s": 9_000.0, "server_us_per_auth": 80.0, "steal_pct": 0.0},
    "verification": {"ok": True, "failures": []},
}
CONNECTIONS: dict[str, Any] = {
    "results": {"connections": 20_000, "rss_per_conn_kib": 4.0},
    "verification": {"ok": True, "failures": []},
}
BASELINES: dict[str, Any] = {
    "results": {"echo": {"server_us_per_msg": 5.0}, "sqlite": {"msgs_per_s": 100_000.0}}
}
DM: dict[str, Any] = {
    "results": {"acked_per_s": 40_000.0, "cpu": {"server_us_per_msg": 20.0}},
    "verification": {"ok": True, "failures": []},
}


def result(key: str, status: str, data: dict[str, Any] | None) -> StepResult:
    res = StepResult(Step(key, key, key, (), 0.0), status)
    res.data = data
    return res


def rows_of(rows: list[Row], scenario: str) -> list[Row]:
    return [r for r in rows if r.scenario == scenario]


@pytest.mark.parametrize("status", ["failed", "interrupted"])
def test_a_run_that_did_not_succeed_never_meets_a_target(status: str) -> None:
    ok = build_table({"auth-storm": result("auth-storm", "ok", AUTH_STORM)})
    assert [r.met for r in ok if r.target is not None] == [True]

    rows = build_table({"auth-storm": result("auth-storm", status, AUTH_STORM)})
    targeted = [r for r in rows if r.target is not None]
    assert targeted and all(r.met is False for r in targeted), rows
    # Its figures are still shown, with its status beside each.
    assert rows_of(rows, "auth-storm") and all(r.status == status for r in rows)
    auths = next(r for r in rows if r.metric == "token auths/s")
    assert auths.ours == 9_000.0
    assert auths.cells()[1:2] == [status]
    assert f"NO (run {status})" in auths.cells()
    assert auths.as_json()["status"] == status and auths.as_json()["met"] is False
    table = markdown_table(rows)
    assert f"| auth-storm | **{status}** | token auths/s | 9,000 |" in table
    assert "yes" not in table


def test_every_run_gets_a_row_with_its_status() -> None:
    rows = build_table(
        {
            "dm": result("dm", "failed", None),  # died before writing results
            "connections": result("connections", "ok", CONNECTIONS),
            "mixed": result("mixed", "skipped", None),
            "baselines": result("baselines", "ok", BASELINES),
        }
    )
    assert [(r.scenario, r.status, r.metric, r.met) for r in rows] == [
        ("dm", "failed", "(no results)", None),
        ("connections", "ok", "idle auth. WS conns", True),
        ("connections", "ok", "server RSS KiB/conn", True),
        ("mixed", "skipped", "(no results)", None),
        ("baselines", "ok", "(reference figures)", None),
    ]
    header = markdown_table(rows).splitlines()[0]
    assert header.startswith("| scenario | status | metric | ours |")


def test_references_come_only_from_a_baselines_run_that_succeeded() -> None:
    def acked(baselines_status: str) -> Row:
        rows = build_table(
            {
                "dm": result("dm", "ok", DM),
                "baselines": result("baselines", baselines_status, BASELINES),
            }
        )
        return next(r for r in rows if r.metric == "acked msgs/s")

    assert acked("ok").reference == 100_000.0
    failed = acked("failed")
    assert (failed.reference, failed.status, failed.met) == (None, "ok", True)


def test_row_met_needs_a_target_and_a_successful_run() -> None:
    target = Target(">=", 10)
    assert Row("s", "m", "", 20.0, target).met is True
    assert Row("s", "m", "", 5.0, target).met is False
    assert Row("s", "m", "", 20.0, target, status="failed").met is False
    assert Row("s", "m", "", None, target, status="failed").met is False
    assert Row("s", "m", "", None, target).met is None
    assert Row("s", "m", "", 20.0, status="failed").met is None  # no target


@pytest.mark.parametrize(
    ("exit_code", "data", "interrupted", "status"),
    [
        (0, {"results": {}, "verification": {"ok": True}}, False, "ok"),
        (0, {"results": {}}, False, "ok"),  # a scenario that verifies nothing itself
        (0, {"results": {}, "verification": {"ok": False}}, False, "failed"),
        (1, {"results": {}, "verification": {"ok": True}}, False, "failed"),
        (1, {"results": {}, "verification": {"ok": False}}, False, "failed"),
        (0, None, False, "failed"),
        (-9, None, True, "interrupted"),
    ],
)
def test_step_status(
    exit_code: int, data: dict[str, Any] | None, interrupted: bool, status: str
) -> None:
    assert step_status(exit_code, data, interrupted=interrupted) == status
