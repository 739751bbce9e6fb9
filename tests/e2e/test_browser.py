"""A real browser against the WebSocket (docs/protocol.md §1.1): headless Chromium
loads a page from an allowed origin, speaks the protocol over ``/ws`` and closes
cleanly; the same page from an origin the server does not allow cannot connect.

Chromium is Debian's ``chromium`` package. Where it is missing, these tests are
skipped with that reason, except under ``CI=true``: there the set-up installs it with
apt-get (as root), and fails when it cannot.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
from typing import TYPE_CHECKING

import pytest
from aiohttp import web

if TYPE_CHECKING:  # the harness is reached through fixtures, never imported at run time
    from conftest import ServerFactory


def _which_chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def chromium() -> str:
    """The Chromium binary, installed from Debian's packages under ``CI=true``."""
    found = _which_chromium()
    if found is not None:
        return found
    if os.environ.get("CI") != "true":
        pytest.skip("Chromium is not installed (apt-get install chromium)")
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.fail("CI=true needs Chromium: not installed, and apt-get cannot run here (root)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "chromium"]):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if done.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-2000:]}")
    found = _which_chromium()
    if found is None:
        pytest.fail("apt-get installed chromium, but no chromium binary is on PATH")
    return found


PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const out = document.getElementById("out");
const replies = [];
const ws = new WebSocket("%(url)s");
ws.onopen = () => {
  ws.send(JSON.stringify({op: "hello", rid: "h", v: 1}));
  ws.send(JSON.stringify({op: "ping", rid: "p"}));
  ws.send(JSON.stringify({op: "nonsense", rid: "n"}));
};
ws.onmessage = (e) => {
  const m = JSON.parse(e.data);
  replies.push([m.rid, m.ok, m.ok ? null : m.error.code]);
  if (replies.length === 3) ws.close(1000);
};
ws.onclose = (e) => {
  out.textContent = "DONE " + JSON.stringify({replies, code: e.code, clean: e.wasClean});
  fetch("/result", {method: "POST", body: out.textContent});
};
</script><img src="/wait"></body></html>"""


class PageServer:
    """Serves the page; the WebSocket URL it opens is set once IMServer listens (the
    allow-list needs the page's origin before IMServer starts).

    The page posts what it saw to ``/result``. Until then its image ``/wait`` is not
    answered, which holds the page's load event, so Chromium's DOM dump (taken after
    the load event) cannot come before the WebSocket has finished.
    """

    def __init__(self) -> None:
        self.ws_url = ""
        self.runner: web.AppRunner | None = None
        self.result: asyncio.Future[str] | None = None

    async def _page(self, _: web.Request) -> web.Response:
        return web.Response(text=PAGE % {"url": self.ws_url}, content_type="text/html")

    async def _result(self, request: web.Request) -> web.Response:
        assert self.result is not None
        if not self.result.done():
            self.result.set_result(await request.text())
        return web.Response(status=204)

    async def _wait(self, _: web.Request) -> web.Response:
        assert self.result is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.result), 30)
        return web.Response(status=204)

    async def start(self) -> str:
        """Listen on a free port; returns the page's origin."""
        app = web.Application()
        self.result = asyncio.get_running_loop().create_future()
        app.router.add_get("/", self._page)
        app.router.add_post("/result", self._result)
        app.router.add_get("/wait", self._wait)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = self.runner.addresses[0][1]
        return f"http://127.0.0.1:{port}"

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()


async def browse(chromium: str, url: str) -> str:
    """What the page printed once its WebSocket closed (Chromium's DOM dump)."""
    with tempfile.TemporaryDirectory() as profile:
        proc = await asyncio.create_subprocess_exec(
            chromium,
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            # Nothing but the page: no calls home, which a closed network refuses slowly.
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            f"--user-data-dir={profile}",
            "--virtual-time-budget=10000",
            "--dump-dom",
            url,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        stdout, _ = await asyncio.wait_for(proc.communicate(), 60)
    found = re.search(r'<pre id="out">(.*?)</pre>', stdout.decode())
    assert found, stdout[-2000:]
    return found.group(1).replace("&quot;", '"')


@pytest.mark.parametrize("allowed", [True, False])
async def test_chromium_speaks_the_protocol_over_the_websocket(
    server_factory: ServerFactory, chromium: str, allowed: bool
) -> None:
    pages = PageServer()
    origin = await pages.start()
    try:
        allow = [origin] if allowed else ["https://elsewhere.example"]
        server = server_factory({"ws": {"allowed_origins": allow}})
        pages.ws_url = server.ws_url
        shown = await browse(chromium, origin + "/")
        assert pages.result is not None and pages.result.done(), shown
        result = pages.result.result()
        assert shown == result  # what the page posted is what it shows
    finally:
        await pages.stop()
    if allowed:
        assert result == (
            'DONE {"replies":[["h",true,null],["p",true,null],["n",false,"bad_request"]],'
            '"code":1000,"clean":true}'
        )
    else:  # refused with 403: the browser reports an abnormal closure
        assert result == 'DONE {"replies":[],"code":1006,"clean":false}'
