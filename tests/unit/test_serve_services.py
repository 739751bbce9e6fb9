"""``imserver serve --services``: the plans refused before anything starts (exit 2,
the reason on stderr), and the whole set of six, which is the embedded mode."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from imserver.cli import main

ETCD = '[etcd]\nendpoints = ["http://127.0.0.1:1"]\n'
SERVER_DB = '[storage]\nurl = "postgresql://postgres@127.0.0.1:5432/nothing"\n'
REDIS = 'live = "redis"\n'
RABBIT = '[events]\nbackend = "rabbitmq"\n'


def refusal(tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, services: str) -> str:
    config = tmp_path / "imserver.toml"
    config.write_text(toml)
    argv = ["serve", "--config", str(config), "--data-dir", str(tmp_path / "data")]
    assert main([*argv, "--services", services]) == 2
    err = capsys.readouterr().err
    assert err.startswith("imserver: ")
    assert not (tmp_path / "data").exists()  # nothing started
    return err


@pytest.mark.parametrize(
    ("toml", "services", "reason"),
    [
        (REDIS + ETCD + SERVER_DB + RABBIT, "gateway,chat", "unknown service chat"),
        (REDIS + ETCD + SERVER_DB + RABBIT, " , ", "names no service"),
        (REDIS + SERVER_DB + RABBIT, "message", "set [etcd] endpoints"),
        (ETCD + SERVER_DB + RABBIT, "gateway", "a gateway apart from the message, user"),
        (ETCD + SERVER_DB + RABBIT, "message,notification", "apart from the gateway need live"),
        (REDIS + ETCD + SERVER_DB, "message", 'backend = "rabbitmq"'),
        (REDIS + ETCD + SERVER_DB, "notification", 'backend = "rabbitmq"'),
        (REDIS + ETCD + RABBIT, "message", "the message service runs on SQLite"),
        (REDIS + ETCD + RABBIT, "gateway,user", "the user service runs on SQLite"),
    ],
)
def test_a_plan_that_cannot_work_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], toml: str, services: str, reason: str
) -> None:
    assert reason in refusal(tmp_path, capsys, toml, services)


def test_every_reason_is_given_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = refusal(tmp_path, capsys, "", "message")
    for reason in ("[etcd] endpoints", 'live = "redis"', "rabbitmq", "SQLite"):
        assert reason in err


def test_the_six_services_are_the_embedded_mode_without_grpc() -> None:
    code = (
        "import sys\n"
        "from imserver.cli import _services\n"
        "from imserver.utils.config import load_config\n"
        "names = 'gateway,user,message,room,file,notification'\n"
        "assert _services(load_config(None), names) is None\n"
        "assert _services(load_config(None), None) is None\n"
        "loaded = [m for m in ('grpc', 'aetcd', 'redis') if m in sys.modules]\n"
        "assert not loaded, loaded\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
