"""With the event stream off (the default), embedded mode builds nothing of it:
no aio-pika import, no relay, the commit listener call as before."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import asyncio, sys
from imserver.core.embedded import build_embedded
from imserver.utils.config import load_config

async def main():
    embedded = await build_embedded(load_config(environ={}, overrides={"data_dir": sys.argv[1]}))
    try:
        assert embedded.events is None
        assert embedded._local_messages.outbox is None
    finally:
        await embedded.drain()
        await embedded.close()

asyncio.run(main())
print(sorted(m for m in sys.modules if m.split(".")[0] in ("aio_pika", "aiormq", "pamqp")))
"""


def test_embedded_mode_imports_no_broker_client(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
