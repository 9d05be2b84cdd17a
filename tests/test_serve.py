"""The live page (repro/serve.py): the websocket protocol in process, then the real page in
headless Chromium driven over the Chrome DevTools protocol.

Everything listens on and connects to 127.0.0.1 only; every wait has a deadline and every
process the tests start is killed in ``finally``. The Chromium test skips when Chromium is not
installed (Debian: ``apt-get install -y --no-install-recommends chromium``) and saves
results/serve/screenshot.png.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

aiohttp = pytest.importorskip("aiohttp", reason="the serve extra is not installed: pip install -e '.[serve]'")

from impl.inference.build import Weights, build_pipeline  # noqa: E402
from impl.inference.config import InferenceConfig  # noqa: E402
from repro.serve import LiveServer, ServeOptions  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "results" / "serve" / "screenshot.png"
CHROMIUM = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", "--window-size=980,620"]


def _session_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith(("live-session", "vae-decode"))]


async def _message(ws, timeout: float = 30.0):
    msg = await asyncio.wait_for(ws.receive(), timeout)
    assert msg.type in (aiohttp.WSMsgType.TEXT, aiohttp.WSMsgType.BINARY), msg
    return json.loads(msg.data) if msg.type == aiohttp.WSMsgType.TEXT else msg.data


async def _block(ws) -> tuple[dict, list[bytes]]:
    """The next block header and its JPEG frames (other text messages are skipped)."""
    while True:
        head = await _message(ws)
        if isinstance(head, dict) and head["type"] == "block":
            return head, [await _message(ws) for _ in range(head["frames"])]
        assert not isinstance(head, dict) or head["type"] != "ended", head


def test_protocol_switches_and_a_disconnect_free_the_session():
    from PIL import Image
    pipe = build_pipeline(InferenceConfig(preset="tiny", dtype="fp32"), "cpu", Weights(text="embedding"))

    async def main() -> None:
        server = LiveServer(pipe, ServeOptions(seed=1))
        base = f"http://127.0.0.1:{await server.start(0)}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
                page = await (await http.get(base + "/")).text()
                assert 'id="prompt"' in page and 'value="cut"' in page
                async with http.ws_connect(base + "/ws") as ws:
                    for bad, why in [("{", "not JSON"), ({"type": "start", "prompt": " "}, "empty prompt"),
                                     ({"type": "switch", "prompt": "a dog"}, "no stream"), ({"type": "dance"}, "type")]:
                        await ws.send_str(bad if isinstance(bad, str) else json.dumps(bad))
                        msg = await _message(ws)
                        assert msg["type"] == "error" and why in msg["message"], (bad, msg)
                    await ws.send_json({"type": "start", "prompt": "a red fox"})
                    assert (await _message(ws)) == {"type": "started", "prompt": "a red fox"}
                    head, frames = await _block(ws)
                    assert head["index"] == 0 and head["prompt"] == "a red fox" and len(frames) == 5
                    assert Image.open(io.BytesIO(frames[0])).size == (64, 64)
                    with pytest.raises(aiohttp.WSServerHandshakeError):  # another site's page
                        await http.ws_connect(base + "/ws", headers={"Origin": "http://example.test"})
                    async with http.ws_connect(base + "/ws") as other:   # one stream per server
                        await other.send_json({"type": "start", "prompt": "a cat"})
                        assert "busy" in (await _message(other))["message"]
                    await ws.send_json({"type": "switch", "prompt": "a grey owl", "mode": "recache"})
                    await ws.send_json({"type": "switch", "prompt": "a grey owl", "mode": "sideways"})
                    while head["prompt"] != "a grey owl":
                        head, _ = await _block(ws)
                    assert head["switch"] == "recache" and head["switch_latency_ms"] > 0
                    status = await (await http.get(base + "/status")).json()
                    assert status["streaming"] and status["prompt"] == "a grey owl" and status["clients"] == 1
                    await ws.send_json({"type": "switch", "prompt": "a beach", "mode": "cut"})
                    while not head["prompt"].endswith("a beach"):
                        head, _ = await _block(ws)
                    assert head["switch"] == "cut" and head["shot"] == 1
                # the page went away mid-stream: the stream stops at the next block boundary
                deadline = time.monotonic() + 30
                while (status := await (await http.get(base + "/status")).json())["streaming"]:
                    assert time.monotonic() < deadline, status
                    await asyncio.sleep(0.1)
                assert not status["session_open"] and status["clients"] == 0
        finally:
            await server.stop()

    asyncio.run(asyncio.wait_for(main(), 120))
    assert pipe._session is None and _session_threads() == []


# ---- the real page in headless Chromium ----

class _DevTools:
    """A minimal Chrome DevTools protocol client over one websocket (responses by id)."""

    def __init__(self, ws):
        self.ws, self._next, self._pending = ws, 0, {}
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            data = json.loads(msg.data)
            fut = self._pending.pop(data.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(data)

    async def __call__(self, method: str, session: str | None = None, **params):
        self._next += 1
        fut = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        msg = {"id": self._next, "method": method, "params": params}
        if session is not None:
            msg["sessionId"] = session
        await self.ws.send_str(json.dumps(msg))
        data = await asyncio.wait_for(fut, 30)
        if "error" in data:
            raise AssertionError(f"{method}: {data['error']}")
        return data["result"]


def _wait_for_url(proc: subprocess.Popen, timeout: float) -> str:
    """The URL the server prints on start (its stdout is read on a thread, with a deadline)."""
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(ln) for ln in proc.stdout], daemon=True).start()
    deadline, seen = time.monotonic() + timeout, []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=0.5)
        except queue.Empty:
            assert proc.poll() is None, f"the server exited ({proc.returncode}): {''.join(seen)}"
            continue
        seen.append(line)
        if line.startswith("serving http://127.0.0.1:"):
            return line.split()[1]
    raise AssertionError(f"no URL from the server within {timeout} s: {''.join(seen)}")


async def _drive(url: str, profile: Path) -> dict:
    """Type a prompt, start, wait for frames, type a switch, wait for it on the page, screenshot."""
    port_file, deadline = profile / "DevToolsActivePort", time.monotonic() + 30
    while not port_file.exists() or len(port_file.read_text().split()) < 2:
        assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
        await asyncio.sleep(0.1)
    port, path = port_file.read_text().split()[:2]
    async with aiohttp.ClientSession() as http, http.ws_connect(f"ws://127.0.0.1:{port}{path}", max_msg_size=0) as ws:
        cdp = _DevTools(ws)
        page = next(t for t in (await cdp("Target.getTargets"))["targetInfos"] if t["type"] == "page")
        sid = (await cdp("Target.attachToTarget", targetId=page["targetId"], flatten=True))["sessionId"]

        async def js(expr: str):
            out = await cdp("Runtime.evaluate", sid, expression=expr, returnByValue=True)
            assert "exceptionDetails" not in out, (expr, out["exceptionDetails"])
            return out["result"].get("value")

        async def until(expr: str, what: str, timeout: float = 60.0):
            end = time.monotonic() + timeout
            while not (value := await js(expr)):
                assert time.monotonic() < end, f"page: {what} within {timeout} s; page: " + str(await js(
                    "Array.from(document.querySelectorAll('dd, input#prompt')).map(e => e.id + '=' + "
                    "(e.value || e.textContent)).join('; ')"))
                await asyncio.sleep(0.2)
            return value

        async def type_prompt(text: str) -> None:
            await js("{ const p = document.getElementById('prompt'); p.focus(); p.select(); true }")
            await cdp("Input.insertText", sid, text=text)

        await until("document.readyState === 'complete' && !!document.getElementById('start')", "the page loads")
        await type_prompt("a red fox runs through fresh snow")
        await js("document.getElementById('start').click(); true")
        await until("Number(document.getElementById('frames').textContent) > 0", "frames arrive")
        await type_prompt("a grey owl glides over the snow")
        await js("document.querySelector('input[value=recache]').click(); document.getElementById('switch').click(); true")
        await until("document.getElementById('active-prompt').textContent === 'a grey owl glides over the snow'",
                    "the switch shows on the page")
        await until("document.getElementById('switch-latency').textContent.startsWith('recache')", "the switch latency")
        status = await (await http.get(url + "status")).json()
        shot = await cdp("Page.captureScreenshot", sid, format="png")
        SCREENSHOT.parent.mkdir(parents=True, exist_ok=True)
        SCREENSHOT.write_bytes(base64.b64decode(shot["data"]))
        await js("document.getElementById('stop').click(); true")
        await until("document.getElementById('state').textContent.startsWith('ended')", "the stream stops")
        frames = await js("Number(document.getElementById('frames').textContent)")
        await cdp("Browser.close")
    return {"status": status, "frames": frames}


def _kill(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium is not installed "
                    "(Debian: apt-get install -y --no-install-recommends chromium)")
@pytest.mark.timeout(180)
def test_live_page_in_headless_chromium(tmp_path):
    server = browser = None
    try:
        server = subprocess.Popen([sys.executable, "-m", "repro", "serve", "--port", "0", "--device", "cpu"],
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        url = _wait_for_url(server, 90)
        assert url.startswith("http://127.0.0.1:")
        profile = tmp_path / "chromium-profile"
        browser = subprocess.Popen([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", url],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        seen = asyncio.run(asyncio.wait_for(_drive(url, profile), 120))
        assert seen["status"]["prompt"] == "a grey owl glides over the snow", seen
        assert seen["frames"] > 5 and SCREENSHOT.stat().st_size > 1000
        server.terminate()                 # SIGTERM: a clean shutdown
        assert server.wait(20) == 0
    finally:
        _kill(browser)
        _kill(server)
