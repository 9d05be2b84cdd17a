"""``python -m repro serve``: a live page that streams a session's frames to a browser.

A small aiohttp server on 127.0.0.1 (loopback only; ``--port 0`` picks a free port, printed on
start) serves one page with a prompt box and a switch-mode choice. The page talks to ``/ws``
(a websocket); each stream is one :class:`impl.session.StreamingSession` run in a worker
thread, which applies the page's prompt switches between pulls (the only place a session
allows them) and sends every block as a JSON header followed by its frames as JPEG messages.
``/status`` reports the stream as JSON. One stream at a time (the pipeline has one KV cache);
a page that closes or disconnects stops its stream at the next block boundary, and the session,
its decoder worker and the thread are freed.

Protocol (JSON text messages). Page -> server: ``{"type": "start", "prompt": P}``,
``{"type": "switch", "prompt": P, "mode": "recache" | "cut" | "direct"}``, ``{"type": "stop"}``.
Server -> page: ``started``, ``block`` (index, prompt, shot, frames, dit_ms, vae_ms, switch,
switch_ms, switch_latency_ms: from the switch's arrival to its first block being ready),
``error`` (message; the stream goes on unless it failed), ``ended`` (reason).

This module imports no torch or aiohttp at import time (the CLI builds its parser cheaply);
aiohttp comes with the ``serve`` extra: ``pip install -e ".[serve]"``.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import io
import json
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from impl.inference.config import add_arguments as add_inference_arguments
from impl.inference.config import config_from_args
from impl.modes import SwitchMode, choices

HOST = "127.0.0.1"
DEFAULT_PROMPT = "A red fox runs through fresh snow in a quiet forest at dawn."
MODES = choices(SwitchMode)
_JOIN_S = 30.0   # a stopping stream finishes its current block first


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--port", type=int, default=8765,
                    help=f"TCP port on {HOST} (loopback only); 0 = any free port, printed on start (default: 8765)")
    add_inference_arguments(ap, skip=("sp_size", "kv_comm"), defaults={"dtype": None})
    ap.add_argument("--weights", default=None, help="diffusers-format Wan2.2-TI2V-5B folder (default: random weights)")
    ap.add_argument("--dit", default=None, help="DiT checkpoint (file or folder) overriding --weights")
    ap.add_argument("--seed", type=int, default=0, help="seed of the noise and of random weights (default: 0)")
    ap.add_argument("--max-blocks", type=int, default=None,
                    help="end a stream after this many blocks (default: run until the page stops it)")
    ap.add_argument("--jpeg-quality", type=int, default=90, help="JPEG quality of streamed frames, 1-95 (default: 90)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")


@dataclass(frozen=True)
class ServeOptions:
    """What a stream is started with."""

    seed: int = 0
    max_blocks: int | None = None
    jpeg_quality: int = 90

    def __post_init__(self) -> None:
        if self.max_blocks is not None and self.max_blocks < 1:
            raise ValueError(f"--max-blocks: must be >= 1, got {self.max_blocks}")
        if not 1 <= self.jpeg_quality <= 95:
            raise ValueError(f"--jpeg-quality: must be in [1, 95], got {self.jpeg_quality}")


def jpeg_frames(frames: Any, quality: int) -> list[bytes]:
    """JPEG bytes of every frame of a block [1, 3, T, H, W] in [-1, 1]."""
    from PIL import Image

    from impl.video_io import frames_to_uint8
    out = []
    for frame in frames_to_uint8(frames):
        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="JPEG", quality=quality)
        out.append(buf.getvalue())
    return out


class Stream:
    """One page's session, run in a worker thread: switches from the page are queued and
    applied between pulls; blocks go to the event loop through a bounded queue (the worker
    waits when the page reads slowly)."""

    def __init__(self, pipe: Any, prompt: str, options: ServeOptions, loop: asyncio.AbstractEventLoop,
                 out: asyncio.Queue):
        self.pipe, self.options, self.loop, self.out = pipe, options, loop, out
        self.prompt = prompt                 # of the latest block sent
        self.next_prompt = prompt
        self.blocks_sent = 0
        self._switches: queue.SimpleQueue = queue.SimpleQueue()   # (prompt, mode, received perf_counter)
        self._stop = threading.Event()
        self._session: Any = pipe.session(prompt, seed=options.seed, max_blocks=options.max_blocks)
        self.thread = threading.Thread(target=self._run, name="live-session", daemon=True)
        self.thread.start()

    def switch(self, prompt: str, mode: str) -> None:
        self._switches.put((prompt, mode, time.perf_counter()))

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float = _JOIN_S) -> bool:
        self.thread.join(timeout)
        return not self.thread.is_alive()

    # ---- worker thread ----
    def _run(self) -> None:
        session, reason, waiting = self._session, "done", None
        self._emit([json.dumps({"type": "started", "prompt": self.prompt})])
        try:
            while not self._stop.is_set():
                waiting = self._apply_switches(session) or waiting
                try:
                    block = next(session)
                except StopIteration:
                    break
                header = {"type": "block", "index": block.index, "prompt": block.prompt, "shot": block.shot,
                          "frames": block.timing.frames, "dit_ms": block.timing.dit_ms, "vae_ms": block.timing.vae_ms,
                          "switch": block.switch, "switch_ms": block.switch_ms, "switch_latency_ms": None}
                if block.switch is not None and waiting is not None:
                    header["switch_latency_ms"] = (block.ready_s - waiting) * 1e3
                    waiting = None
                frames = jpeg_frames(block.frames, self.options.jpeg_quality) if block.frames is not None else []
                self.prompt, self.blocks_sent = block.prompt, self.blocks_sent + 1
                if not self._emit([json.dumps(header), *frames]):
                    reason = "stopped"
                    break
            else:
                reason = "stopped"
        except Exception as exc:   # reported to the page; the session is freed below
            reason = f"failed: {type(exc).__name__}: {exc}"
            self._emit([json.dumps({"type": "error", "message": reason})])
        finally:
            try:
                if reason == "done":
                    session.close()
                else:
                    session.abort()   # a page gone mid-stream: drop the blocks in flight
            except Exception as exc:  # a failed last decode: the session is freed all the same
                reason = f"failed: {type(exc).__name__}: {exc}"
            self._session = None
            self._emit([json.dumps({"type": "ended", "reason": reason})])

    def _apply_switches(self, session: Any) -> float | None:
        """Apply the queued switches (the last one decides); when the last was received."""
        received = None
        while True:
            try:
                prompt, mode, t = self._switches.get_nowait()
            except queue.Empty:
                return received
            try:
                session.switch(prompt, mode)
            except ValueError as exc:
                self._emit([json.dumps({"type": "error", "message": str(exc)})])
                continue
            self.next_prompt, received = session.prompt, t

    def _emit(self, parts: list) -> bool:
        """Hand a message to the event loop, waiting while its queue is full; False once stopped."""
        try:
            fut = asyncio.run_coroutine_threadsafe(self.out.put(parts), self.loop)
        except RuntimeError:   # the loop is closed: the server is shutting down
            return False
        while True:
            try:
                fut.result(timeout=0.1)
                return True
            except concurrent.futures.TimeoutError:
                if self._stop.is_set() or self.loop.is_closed():
                    fut.cancel()
                    return False


class LiveServer:
    """The page, the websocket and the status endpoint over one pipeline."""

    def __init__(self, pipe: Any, options: ServeOptions = ServeOptions()):
        self.pipe, self.options = pipe, options
        self.stream: Stream | None = None
        self.clients = 0
        self._runner: Any = None

    def app(self):
        from aiohttp import web
        app = web.Application()
        app.router.add_get("/", self._page)
        app.router.add_get("/status", self._status)
        app.router.add_get("/ws", self._websocket)
        return app

    async def start(self, port: int = 0) -> int:
        """Listen on 127.0.0.1:``port``; returns the bound port."""
        from aiohttp import web
        self._runner = web.AppRunner(self.app(), handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, HOST, port)
        await site.start()
        return self._runner.addresses[0][1]

    async def stop(self) -> None:
        """Stop the stream (its session freed) and the server."""
        if self.stream is not None:
            await self._end(self.stream)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # ---- handlers ----
    async def _page(self, request):
        from aiohttp import web
        import html
        page = PAGE.replace("__DEFAULT_PROMPT__", html.escape(DEFAULT_PROMPT))
        return web.Response(text=page.replace("__FPS__", str(self.pipe.preset.video.fps)), content_type="text/html")

    async def _status(self, request):
        from aiohttp import web
        s = self.stream
        return web.json_response({
            "streaming": s is not None and s.thread.is_alive(),
            "prompt": None if s is None else s.prompt, "next_prompt": None if s is None else s.next_prompt,
            "blocks_sent": 0 if s is None else s.blocks_sent, "clients": self.clients,
            "session_open": getattr(self.pipe, "_session", None) is not None,
            "preset": self.pipe.preset.name, "decoder": self.pipe.cfg.decoder,
        })

    async def _websocket(self, request):
        from urllib.parse import urlsplit

        from aiohttp import WSMsgType, web
        origin = request.headers.get("Origin")
        if origin is not None and urlsplit(origin).netloc != request.host:   # another site's page in the browser
            raise web.HTTPForbidden(text=f"websocket from {origin} refused: only this server's own page may stream")
        ws = web.WebSocketResponse(heartbeat=20.0)
        await ws.prepare(request)
        self.clients += 1
        out: asyncio.Queue = asyncio.Queue(maxsize=2)   # a slow page holds the stream back, not memory
        sender = asyncio.create_task(self._send(ws, out))
        mine: Stream | None = None
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                mine = await self._handle(msg.data, mine, out)
        finally:
            self.clients -= 1
            if mine is not None:
                await self._end(mine)
            sender.cancel()
            await ws.close()
        return ws

    async def _handle(self, text: str, mine: Stream | None, out: asyncio.Queue) -> Stream | None:
        """One page message; returns the page's stream afterwards."""
        from impl.session_inputs import check_prompt
        prefix = self.pipe.stream.scene_cut_prefix

        async def error(message: str) -> None:
            await out.put([json.dumps({"type": "error", "message": message})])

        try:
            req = json.loads(text)
            kind = req.get("type") if isinstance(req, dict) else None
        except json.JSONDecodeError:
            await error("not JSON: send {\"type\": \"start\" | \"switch\" | \"stop\", ...}")
            return mine
        try:
            if kind == "start":
                prompt = check_prompt(req.get("prompt"), prefix)
                if mine is not None:
                    await self._end(mine)
                    mine = None
                if self.stream is not None:
                    await error("busy: another page is streaming (one session per server: the model has one "
                                "KV cache); stop it or wait")
                    return None
                try:
                    mine = self.stream = Stream(self.pipe, prompt, self.options, asyncio.get_running_loop(), out)
                except RuntimeError as exc:   # impl.session.SessionError: the pipeline is still in use
                    await error(str(exc))
                    return None
            elif kind == "switch":
                mode = req.get("mode", "recache")
                if mode not in MODES:
                    raise ValueError(f"mode: must be one of {list(MODES)}, got {mode!r}")
                check_prompt(req.get("prompt"), prefix)
                if mine is None or not mine.thread.is_alive():
                    raise ValueError("switch: no stream is running; start one first")
                mine.switch(req["prompt"], mode)
            elif kind == "stop":
                if mine is not None:
                    await self._end(mine)
                mine = None
            else:
                raise ValueError(f"type: must be 'start', 'switch' or 'stop', got {kind!r}")
        except ValueError as exc:
            await error(str(exc))
        return mine

    async def _end(self, stream: Stream) -> None:
        stream.stop()
        await asyncio.get_running_loop().run_in_executor(None, stream.join)
        if self.stream is stream:
            self.stream = None

    @staticmethod
    async def _send(ws, out: asyncio.Queue) -> None:
        try:
            while True:
                for part in await out.get():
                    if isinstance(part, str):
                        await ws.send_str(part)
                    else:
                        await ws.send_bytes(part)
        except (ConnectionError, RuntimeError):   # the page went away; the reader ends the stream
            return


def run(args: argparse.Namespace) -> int:
    """Build the pipeline, serve until Ctrl-C or SIGTERM."""
    import importlib.util
    if importlib.util.find_spec("aiohttp") is None:
        raise ValueError("serve: needs aiohttp; install the serve extra: pip install -e \".[serve]\"")
    from impl.inference.build import Weights, build_pipeline
    from repro.generate import check_device
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port: must be in [0, 65535], got {args.port}")
    options = ServeOptions(seed=args.seed, max_blocks=args.max_blocks, jpeg_quality=args.jpeg_quality)
    device = check_device(args.device)   # a bad --device is one line, exit 2
    cfg = config_from_args(args, dtype=args.dtype or ("bf16" if device.type == "cuda" else "fp32"))
    weights = Weights(root=args.weights, dit=args.dit, text="encoder" if args.weights else "embedding", seed=args.seed)
    pipe = build_pipeline(cfg, device, weights)
    asyncio.run(_serve(LiveServer(pipe, options), args.port))
    return 0


async def _serve(server: LiveServer, port: int) -> None:
    import signal
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    bound = await server.start(port)
    print(f"serving http://{HOST}:{bound}/ ({server.pipe.preset.name} preset, decoder {server.pipe.cfg.decoder}); "
          "Ctrl-C stops", flush=True)
    try:
        await done.wait()
    finally:
        await server.stop()


# The page: a prompt box, the switch mode, the frames played at the video's frame rate, and the
# stream's state (the prompt of the frame on screen, block, switch latency, per-block timings).
PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>LongLive live</title>
<style>
 body { font: 15px system-ui, sans-serif; background: #15171a; color: #e8e8e8; margin: 24px; }
 h1 { font-size: 20px; margin: 0 0 16px; }
 .layout { display: flex; gap: 24px; align-items: flex-start; }
 #view { width: 384px; height: 384px; image-rendering: pixelated; background: #000; border: 1px solid #333; }
 #prompt { width: 420px; padding: 6px; font: inherit; background: #222; color: #eee; border: 1px solid #444; }
 fieldset { border: 1px solid #333; margin: 10px 0; }
 button { font: inherit; padding: 5px 14px; margin-right: 6px; }
 dl { display: grid; grid-template-columns: 150px 1fr; gap: 4px 10px; margin: 12px 0 0; }
 dt { color: #999; } dd { margin: 0; }
 #message { color: #f88; }
</style></head>
<body>
<h1>LongLive-2.0 live stream</h1>
<div class="layout">
 <img id="view" alt="stream">
 <div>
  <input id="prompt" value="__DEFAULT_PROMPT__" aria-label="prompt">
  <fieldset><legend>switch mode</legend>
   <label><input type="radio" name="mode" value="recache" checked> continuous, KV re-cache</label><br>
   <label><input type="radio" name="mode" value="direct"> continuous, no re-cache</label><br>
   <label><input type="radio" name="mode" value="cut"> scene cut</label>
  </fieldset>
  <button id="start" type="button">Start</button>
  <button id="switch" type="button" disabled>Switch prompt</button>
  <button id="stop" type="button" disabled>Stop</button>
  <dl>
   <dt>state</dt><dd id="state">idle</dd>
   <dt>active prompt</dt><dd id="active-prompt">-</dd>
   <dt>block</dt><dd id="block">-</dd>
   <dt>frames received</dt><dd id="frames">0</dd>
   <dt>last switch</dt><dd id="switch-latency">-</dd>
   <dt>DiT / VAE per block</dt><dd id="timing">-</dd>
   <dt>message</dt><dd id="message"></dd>
  </dl>
 </div>
</div>
<script>
const $ = (id) => document.getElementById(id);
const FPS = __FPS__, MAX_QUEUE = 2 * FPS;     // play at the video rate; drop frames beyond 2 s behind
let ws = null, header = null, received = 0, queue = [];
function setState(s) {
  $("state").textContent = s;
  const live = s === "streaming";
  $("switch").disabled = !live; $("stop").disabled = !live;
}
function send(msg) { ws.send(JSON.stringify(msg)); }
function connect(then) {
  ws = new WebSocket(`ws://${location.host}/ws`);
  ws.binaryType = "blob";
  ws.onopen = then;
  ws.onmessage = onMessage;
  ws.onclose = () => setState("disconnected");
}
function onMessage(ev) {
  if (typeof ev.data !== "string") {            // one JPEG frame of the current block
    queue.push({url: URL.createObjectURL(ev.data), prompt: header.prompt});
    if (queue.length > MAX_QUEUE) URL.revokeObjectURL(queue.shift().url);
    $("frames").textContent = ++received;
    return;
  }
  const m = JSON.parse(ev.data);
  if (m.type === "block") {
    header = m;
    $("block").textContent = `${m.index} (shot ${m.shot})`;
    $("timing").textContent = `${m.dit_ms.toFixed(0)} ms / ${m.vae_ms.toFixed(0)} ms`;
    if (m.switch_latency_ms !== null)
      $("switch-latency").textContent = `${m.switch}: ${m.switch_latency_ms.toFixed(0)} ms to the first new block`;
  } else if (m.type === "started") { setState("streaming"); $("message").textContent = ""; }
  else if (m.type === "error") { $("message").textContent = m.message; }
  else if (m.type === "ended") { setState(`ended (${m.reason})`); }
}
function mode() { return document.querySelector("input[name=mode]:checked").value; }
$("start").onclick = () => {
  const go = () => send({type: "start", prompt: $("prompt").value});
  if (ws && ws.readyState === WebSocket.OPEN) go(); else connect(go);
};
$("switch").onclick = () => send({type: "switch", prompt: $("prompt").value, mode: mode()});
$("stop").onclick = () => send({type: "stop"});
setInterval(() => {
  const f = queue.shift();
  if (!f) return;
  const img = $("view"), old = img.src;
  img.src = f.url;
  $("active-prompt").textContent = f.prompt;
  if (old.startsWith("blob:")) URL.revokeObjectURL(old);
}, 1000 / FPS);
</script>
</body></html>
"""
