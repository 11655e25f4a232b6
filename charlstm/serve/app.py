"""`charlstm serve`: the HTTP side (aiohttp). The page, the completion API, health, models,
Prometheus metrics and a run folder's training curves; the engine work is the Batcher's.

Every request's failure is its own: bad input gets its error JSON (status = error.code), an
unexpected exception a 500 for that request only, and the engine thread goes on for the others.
A client that goes away cancels its handler (aiohttp's handler_cancellation), which cancels its
job: the engine drops the stream at its next call.
"""
import asyncio
import hmac
import ipaddress
import json
import os
import signal
import sys
import time
import uuid
from importlib import resources

import numpy as np
from aiohttp import web

from charlstm.serve.api import BODY_LIMIT, ApiError, error_body, parse_completion, read_body
from charlstm.serve.batcher import Batcher, Busy, Job

RETRY_AFTER = 1  # seconds a 503 asks the client to wait
OPEN_PATHS = ("/", "/health", "/favicon.ico")  # and /static/*: reachable without the key
COUNTERS = {  # Prometheus name: (kind, help)
    "chars_generated": ("counter", "Characters generated for clients."),
    "prompt_chars": ("counter", "Prompt characters fed."),
    "streams_cancelled": ("counter", "Streams ended because their client went away."),
    "engine_steps": ("counter", "Engine steps (one character for every active stream)."),
    "model_reloads": ("counter", "Newer checkpoints loaded from the run folder."),
}


class Server:
    def __init__(self, source, batcher, api_key=None, max_tokens_limit=4096, precision="f32"):
        self.source, self.batcher, self.api_key = source, batcher, api_key
        self.max_tokens_limit, self.precision = max_tokens_limit, precision
        self.requests = {}  # HTTP status -> finished requests
        self.page = resources.files("charlstm.serve") / "page"

    def app(self):
        app = web.Application(middlewares=[self.errors, self.auth], client_max_size=BODY_LIMIT)
        app.router.add_get("/", self.index)
        app.router.add_get("/static/{name}", self.static)
        app.router.add_get("/health", self.health)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/api/model", self.model)
        app.router.add_get("/api/run", self.run)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_post("/v1/completions", self.completions)
        return app

    # -------------------------------------------------------------- middlewares

    @web.middleware
    async def errors(self, request, handler):
        """Every error as {"error": {...}} with its status; the status counted."""
        try:
            response = await handler(request)
        except ApiError as e:
            response = web.json_response(e.body(), status=e.code)
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 (body over client_max_size)
            if e.status < 400:
                raise
            message = {413: f"the request body is over {BODY_LIMIT} bytes"}.get(e.status, e.reason)
            response = web.json_response(error_body(e.status, message), status=e.status)
        except (asyncio.CancelledError, ConnectionResetError):
            self.requests[499] = self.requests.get(499, 0) + 1  # nginx's "client closed request"
            raise
        except Exception as e:  # a bug: this request fails, the server stays
            print(f"charlstm serve: error in {request.method} {request.path}: {e!r}", file=sys.stderr)
            response = web.json_response(error_body(500, f"internal error: {e}"), status=500)
        if isinstance(response, web.StreamResponse):
            self.requests[response.status] = self.requests.get(response.status, 0) + 1
        if response.status == 503:
            response.headers["Retry-After"] = str(RETRY_AFTER)
        return response

    @web.middleware
    async def auth(self, request, handler):
        if self.api_key and request.path not in OPEN_PATHS and not request.path.startswith("/static/"):
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {self.api_key}".encode()):
                raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'"
                               if given else "missing API key: send the header 'Authorization: Bearer <key>'")
        return await handler(request)

    # -------------------------------------------------------------- the page and the facts

    async def index(self, request):
        return web.Response(body=(self.page / "index.html").read_bytes(), content_type="text/html", charset="utf-8")

    async def static(self, request):
        name = request.match_info["name"]
        file = self.page / name
        if "/" in name or name.startswith(".") or not file.is_file():
            raise ApiError(404, f"no such file: /static/{name}")
        kind = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg": "image/svg+xml"}
        extension = os.path.splitext(name)[1]
        return web.Response(body=file.read_bytes(), content_type=kind.get(extension, "text/plain"),
                            charset=None if extension in (".png",) else "utf-8")

    async def health(self, request):
        return web.json_response({"status": "ok", "streams_active": self.batcher.active,
                                  "streams_queued": len(self.batcher.waiting), "auth": bool(self.api_key)})

    async def models(self, request):
        model = self.source.model
        return web.json_response({"object": "list", "data": [
            {"id": model.name, "object": "model", "created": int(model.loaded_at), "owned_by": "charlstm"}]})

    async def model(self, request):
        facts = self.source.model.facts()
        facts.update(precision=self.precision, max_tokens_limit=self.max_tokens_limit,
                     reloads=self.source.reloads, run_folder=self.source.folder is not None)
        return web.json_response(facts)

    async def run(self, request):
        if self.source.folder is None:
            raise ApiError(404, "this server serves a checkpoint file, not a run folder: no training run to show")
        records = await asyncio.to_thread(self.source.metrics)
        return web.json_response({"records": records, "model_step": self.source.model.manifest.get("step", 0)})

    async def metrics(self, request):
        lines = []
        for name, (kind, text) in COUNTERS.items():
            lines += [f"# HELP charlstm_{name}_total {text}", f"# TYPE charlstm_{name}_total {kind}",
                      f"charlstm_{name}_total {self.batcher.counters.get(name, 0)}"]
        lines += ["# HELP charlstm_streams_active Streams being generated now.", "# TYPE charlstm_streams_active gauge",
                  f"charlstm_streams_active {self.batcher.active}",
                  "# HELP charlstm_streams_queued Requests waiting for a stream.", "# TYPE charlstm_streams_queued gauge",
                  f"charlstm_streams_queued {len(self.batcher.waiting)}",
                  "# HELP charlstm_requests_total Finished requests by HTTP status.",
                  "# TYPE charlstm_requests_total counter"]
        lines += [f'charlstm_requests_total{{code="{code}"}} {n}' for code, n in sorted(self.requests.items())]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    # -------------------------------------------------------------- completions

    async def completions(self, request):
        model = self.source.model
        body = read_body(await request.read())
        c = parse_completion(body, model.name, model.config.vocab, self.max_tokens_limit)
        pieces, rng = asyncio.Queue(), np.random.Generator(np.random.PCG64(c.seed))
        job = Job(c.prompt, c.max_tokens, rng, c.temperature, c.top_k, c.top_p, c.stop, pieces)
        try:
            self.batcher.submit(job)
        except Busy:
            raise ApiError(503, f"every stream ({self.batcher.max_streams}) and queue place "
                                f"({self.batcher.max_queue}) is taken; retry shortly") from None
        self.batcher.count("prompt_chars", len(c.prompt))
        head = {"id": f"cmpl-{uuid.uuid4().hex[:24]}", "object": "text_completion", "created": int(time.time()),
                "model": model.name}
        try:
            if c.stream:
                return await self._stream(request, c, head, pieces, job)
            return await self._whole(c, head, pieces)
        finally:
            job.cancelled = True  # no-op for a finished job; ends one whose client went away

    async def _whole(self, c, head, pieces):
        text, reason = [c.prompt] if c.echo else [], None
        while reason is None:
            piece, reason = await pieces.get()
            text.append(piece)
        if reason == "error":
            raise ApiError(500, text[-1])
        text = "".join(text)
        generated = len(text) - (len(c.prompt) if c.echo else 0)
        return web.json_response({**head, "choices": [{"text": text, "index": 0, "logprobs": None,
                                                        "finish_reason": reason}], "usage": _usage(c, generated)})

    async def _stream(self, request, c, head, pieces, job):
        """Server-sent events: a `data: {json}` event per piece, the last with finish_reason and usage,
        then `data: [DONE]`."""
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                               "X-Accel-Buffering": "no"})
        await response.prepare(request)

        async def send(text, reason, **extra):
            event = {**head, "choices": [{"text": text, "index": 0, "logprobs": None, "finish_reason": reason}],
                     **extra}
            await response.write(f"data: {json.dumps(event)}\n\n".encode())

        try:
            if c.echo and c.prompt:
                await send(c.prompt, None)
            reason = None
            while reason is None:
                piece, reason = await pieces.get()
                while reason is None and not pieces.empty():  # what came meanwhile, in one event
                    more, reason = pieces.get_nowait()
                    piece += more
                if reason == "error":
                    await response.write(f"data: {json.dumps(error_body(500, piece))}\n\n".encode())
                    break
                await send(piece, reason, **({"usage": _usage(c, job.chars)} if reason else {}))
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
        except ConnectionResetError:  # the client went away: normal, nothing to report
            job.cancelled = True
        return response


def _hand_out(items):
    """The engine call's pieces, each to its request's queue (on the event loop)."""
    for job, piece, reason in items:
        job.reader.put_nowait((piece, reason))


def _usage(c, generated):
    return {"prompt_tokens": len(c.prompt), "completion_tokens": generated, "total_tokens": len(c.prompt) + generated}


# ------------------------------------------------------------------ running it

def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


async def _serve(server, host, port, ready):
    runner = web.AppRunner(server.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as e:
        await runner.cleanup()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
    bound = runner.addresses[0][1] if runner.addresses else port
    loop = asyncio.get_running_loop()
    server.batcher.post = lambda items: loop.call_soon_threadsafe(_hand_out, items)
    ready(bound)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):  # Windows: Ctrl-C raises KeyboardInterrupt
            pass
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


def serve(source, host="127.0.0.1", port=8000, api_key=None, max_streams=32, max_queue=64, max_tokens_limit=4096,
          precision="f32", ready=print):
    """Serve until SIGINT or SIGTERM. ready(port) is called once listening."""
    batcher = Batcher(source, precision, max_streams, max_queue)
    batcher.start()
    server = Server(source, batcher, api_key, max_tokens_limit, precision)
    try:
        asyncio.run(_serve(server, host, port, ready))
    except KeyboardInterrupt:
        pass
    finally:
        batcher.stop()
