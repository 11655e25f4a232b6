"""`charlstm serve`'s HTTP API (issue #31, docs/serve.md) against a real server process on a tiny
model: the facts it reports, completions streamed and not, the same text as `charlstm sample` for a
seed (alone and beside 31 other streams), every bad request refused with the right status and error
JSON while other streams go on, the API key, a client that goes away, the queue and its 503, and
a run folder reloaded while a trainer writes to it. Clients are the standard library (one request
at a time) and aiohttp's (many at once)."""
import asyncio
import http.client
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from tests.conftest import SHAKESPEARE_HEAD, TINY, cli_runner, seconds

aiohttp = pytest.importorskip("aiohttp")  # the serve extra

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
PORT_LINE = re.compile(r"http://127\.0\.0\.1:(\d+)/")  # the contract's startup line
LIMIT = 10**8  # the main server's --max-tokens-limit: room for streams that run until cut
OUTSIDE = "Zé"  # not in the tiny corpus's vocabulary


def charlstm(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "charlstm", *map(str, args)], capture_output=True, text=True,
                          env=ENV, timeout=seconds(timeout))


# ---------------------------------------------------------------------------------- clients

class Reply:
    def __init__(self, status, headers, body):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


class Server:
    """A `charlstm serve` process on 127.0.0.1 and a free port. A thread keeps reading its stderr
    (so the pipe never fills) and finds the port in the startup line."""

    def __init__(self, source, *options, start_timeout=120):
        command = [sys.executable, "-m", "charlstm", "serve", str(source), "--host", "127.0.0.1", "--port", "0",
                   "--threads", "1", *map(str, options)]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV)
        self.lines, self.port, started = [], None, threading.Event()
        threading.Thread(target=self._collect, args=(started,), daemon=True).start()
        if not started.wait(seconds(start_timeout)) or self.port is None:  # cold Numba caches compile first
            self.stop(check=False)
            raise AssertionError(f"no startup line from {command}:\n{self.stderr}")
        self.url = f"http://127.0.0.1:{self.port}"

    def _collect(self, started):
        for line in self.proc.stderr:
            self.lines.append(line)
            found = PORT_LINE.search(line)
            if found and self.port is None:
                self.port = int(found.group(1))
                started.set()
        started.set()  # end of stderr: the process is gone

    @property
    def stderr(self):
        return "".join(self.lines)

    def stop(self, check=True):
        """SIGTERM, as `kill` sends: the contract says it stops cleanly (exit 0)."""
        if self.proc.poll() is None:
            self.proc.terminate()
        try:
            code = self.proc.wait(seconds(30))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        if check:
            assert code == 0 and "Traceback" not in self.stderr, self.stderr

    def connect(self, timeout=60):
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=seconds(timeout))

    def request(self, method, path, body=None, headers=None, timeout=60):
        """One request on a fresh connection; a dict or list body goes as JSON."""
        if isinstance(body, (dict, list)):
            body = json.dumps(body).encode()
        conn = self.connect(timeout)
        try:
            try:
                conn.request(method, path, body=body, headers=headers or {})
            except (BrokenPipeError, ConnectionResetError):
                pass  # the server answered before reading the whole body (413): its answer can still be read
            response = conn.getresponse()
            return Reply(response.status, response.headers, response.read())
        finally:
            conn.close()

    def get(self, path, **kw):
        return self.request("GET", path, **kw)

    def complete(self, headers=None, **body):
        return self.request("POST", "/v1/completions", body, headers)

    def ok(self, **body):
        """A completion that must succeed: its choice (text, finish_reason) and usage."""
        reply = self.complete(**body)
        assert reply.status == 200, reply.body
        answer = reply.json()
        return answer["choices"][0], answer["usage"]

    def open_stream(self, **body):
        """Start a streamed completion: (its events, a function that cuts the connection)."""
        conn = self.connect()
        conn.request("POST", "/v1/completions", json.dumps({**body, "stream": True}), {"Content-Type": "application/json"})
        sock = conn.sock  # kept: http.client drops its own reference when the answer says it will close
        response = conn.getresponse()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/event-stream")

        def cut():
            sock.shutdown(socket.SHUT_RDWR)  # now, whatever else still refers to the socket
            response.close()
            conn.close()
        return events(response.readline), cut

    def stream(self, **body):
        """(text, finish_reason, usage) of a whole streamed completion."""
        read, cut = self.open_stream(**body)
        try:
            return joined(list(read))
        finally:
            cut()

    def metrics(self, **kw):
        reply = self.get("/metrics", **kw)
        assert reply.status == 200
        return parse_metrics(reply.body.decode())

    def health(self):
        reply = self.get("/health")
        assert reply.status == 200
        return reply.json()


def events(readline):
    """The payloads of the `data:` lines of a server-sent event stream, [DONE] included; an event
    ends at a blank line. readline returns bytes, b'' at the end."""
    data = []
    while True:
        line = readline()
        if not line:
            assert not data, "the stream ended inside an event"
            return
        line = line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield "\n".join(data)
            data = []


def joined(payloads):
    """(text, finish_reason, usage) of a whole stream, checking its shape on the way: JSON events
    with finish_reason null but the last, which carries usage, then [DONE]."""
    assert payloads and payloads[-1] == "[DONE]", payloads[-3:]
    chunks = [json.loads(p) for p in payloads[:-1]]
    assert chunks and all(c["object"] == "text_completion" and c["id"] == chunks[0]["id"] for c in chunks)
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])
    last = chunks[-1]
    assert last["choices"][0]["finish_reason"] in ("length", "stop") and last["usage"]
    return "".join(c["choices"][0]["text"] for c in chunks), last["choices"][0]["finish_reason"], last["usage"]


def parse_metrics(text):
    """Prometheus text -> {'name' or 'name{labels}': value}."""
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(None, 1)
            values[name] = float(value)
    return values


async def complete_async(session, url, body, headers=None):
    """(status, text, finish_reason) of one completion, streamed or not, through aiohttp."""
    async with session.post(url + "/v1/completions", json=body, headers=headers) as r:
        if r.status != 200:
            return r.status, await r.text(), None
        if not body.get("stream"):
            choice = (await r.json())["choices"][0]
            return 200, choice["text"], choice["finish_reason"]
        payloads, data = [], []
        async for line in r.content:
            line = line.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].removeprefix(" "))
            elif not line and data:
                payloads.append("\n".join(data))
                data = []
        text, finish, _ = joined(payloads)
        return 200, text, finish


def run_async(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, seconds(120)))


def idle(server, auth=False):
    health = server.health()
    return {k: health.get(k) for k in ("status", "streams_active", "streams_queued", "auth")} == {
        "status": "ok", "streams_active": 0, "streams_queued": 0, "auth": auth}


def wait_until(condition, timeout=10, every=0.05, what="condition"):
    deadline = time.monotonic() + seconds(timeout)
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def sample_cli(checkpoint, prime, length, seed=0, temperature=None, top_k=None, top_p=None, argmax=False, stop=None):
    """What `charlstm sample` prints after the prime, without its final newline."""
    from charlstm.cli import cli

    args = ["sample", str(checkpoint), "--length", length, "--seed", seed, "--threads", 1]
    for flag, value in [("--prime", prime or None), ("--temperature", temperature), ("--top-k", top_k),
                        ("--top-p", top_p), ("--stop", stop)]:
        args += [flag, value] if value is not None else []
    result = cli_runner().invoke(cli, [str(a) for a in args + (["--argmax"] if argmax else [])], catch_exceptions=False)
    out = result.stdout_bytes.decode()
    assert result.exit_code == 0 and out.startswith(prime) and out.endswith("\n"), result.output
    return out[len(prime):-1]


def has_top_p():
    from charlstm.cli import cli

    return any("--top-p" in p.opts for p in cli.commands["sample"].params)


# ---------------------------------------------------------------------------------- fixtures

def train_tiny(folder, run, *options):
    corpus = folder / "corpus.txt"
    corpus.write_text((SHAKESPEARE_HEAD * 3)[:1000], encoding="utf-8")
    done = charlstm("train", corpus, *TINY, *options, "--out", folder, "--run", run, "--quiet", timeout=300)
    assert done.returncode == 0, done.stderr
    return folder / run


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A 40-step tiny run: step-00000030/35/40.npz, best.npz, latest.npz, metrics.jsonl."""
    return train_tiny(tmp_path_factory.mktemp("serve"), "tiny", "--steps", 40)


@pytest.fixture(scope="module")
def ckpt(run_folder):
    return run_folder / "best.npz"


@pytest.fixture(scope="module")
def server(ckpt):
    s = Server(ckpt, "--max-tokens-limit", LIMIT)
    yield s
    s.stop()


# ---------------------------------------------------------------------------------- what it says

def test_health_models_and_model_facts_match_info(server, ckpt):
    assert idle(server)
    models = server.get("/v1/models").json()
    assert models["object"] == "list" and len(models["data"]) == 1
    name = models["data"][0]["id"]
    assert name and models["data"][0]["object"] == "model" and models["data"][0]["owned_by"] == "charlstm"
    assert isinstance(models["data"][0]["created"], int)
    info = json.loads(charlstm("info", "--json", ckpt).stdout)
    facts = server.get("/api/model").json()
    val = info["metrics"]["val_loss"]
    assert facts["id"] == name and Path(facts["source"]).resolve() == ckpt.resolve()
    assert (facts["layers"], facts["hidden"], facts["peepholes"], facts["parameters"]) == (
        info["model"]["layers"], info["model"]["hidden"], info["model"]["peepholes"], info["param_count"])
    assert facts["vocab"] == info["model"]["vocab"] and facts["vocab_size"] == len(info["model"]["vocab"])
    assert facts["step"] == info["step"] == 40
    assert math.isclose(facts["val_loss"], val, rel_tol=1e-9)
    assert math.isclose(facts["val_bpc"], val / math.log(2), rel_tol=1e-9)
    assert (facts["precision"], facts["max_tokens_limit"], facts["reloads"], facts["run_folder"]) == ("f32", LIMIT, 0, False)
    assert abs(facts["loaded_at"] - time.time()) < seconds(600)
    reply = server.get("/api/run")  # a checkpoint file has no run to show
    assert reply.status == 404 and reply.json()["error"]["type"] == "not_found_error"


def test_page_static_files_and_unknown_paths(server):
    page = server.get("/")
    assert page.status == 200 and page.headers["Content-Type"].startswith("text/html")
    for path in (ROOT / "charlstm" / "serve" / "page").iterdir():
        if path.name != "index.html":
            assert server.get(f"/static/{path.name}").body == path.read_bytes()
    refused(server.get("/no/such/path"), 404)


def test_metrics_count_requests_and_characters(server):
    before = server.metrics()
    server.ok(prompt="First", max_tokens=77, seed=1)
    assert server.complete(prompt=5).status == 400
    after = server.metrics()
    assert after["charlstm_chars_generated_total"] - before["charlstm_chars_generated_total"] == 77
    assert after["charlstm_prompt_chars_total"] - before["charlstm_prompt_chars_total"] == 5
    ok, bad = 'charlstm_requests_total{code="200"}', 'charlstm_requests_total{code="400"}'
    assert after[ok] >= before.get(ok, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    for name in ("charlstm_streams_active", "charlstm_streams_queued", "charlstm_streams_cancelled_total",
                 "charlstm_engine_steps_total", "charlstm_model_reloads_total"):
        assert name in after
    assert after["charlstm_engine_steps_total"] > before["charlstm_engine_steps_total"]


# ---------------------------------------------------------------------------------- completions

def test_completion_and_its_stream_agree(server):
    choice, usage = server.ok(prompt="First", max_tokens=300, seed=4, temperature=0.9)
    assert len(choice["text"]) == 300 and choice["finish_reason"] == "length" and choice["index"] == 0
    assert usage == {"prompt_tokens": 5, "completion_tokens": 300, "total_tokens": 305}
    assert server.stream(prompt="First", max_tokens=300, seed=4, temperature=0.9) == (choice["text"], "length", usage)
    reply = server.complete(prompt="First", max_tokens=3, seed=4).json()
    assert reply["object"] == "text_completion" and reply["id"].startswith("cmpl-") and reply["model"]
    assert isinstance(reply["created"], int) and reply["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("prime,length,seed,settings", [
    ("First", 400, 3, {}),
    ("First Citizen:\n", 250, 11, {"temperature": 0.7}),
    ("All", 300, 5, {"temperature": 1.3, "top_k": 4}),
    ("", 200, 9, {}),  # no prime: the first character is drawn uniformly, as sample does
])
def test_seed_gives_the_text_sample_prints(server, ckpt, prime, length, seed, settings):
    text = server.ok(prompt=prime, max_tokens=length, seed=seed, **settings)[0]["text"]
    assert text == sample_cli(ckpt, prime, length, seed, **settings)


def test_temperature_0_is_argmax_and_top_p(server, ckpt):
    greedy = server.ok(prompt="First", max_tokens=200, temperature=0, seed=1)[0]["text"]
    assert greedy == sample_cli(ckpt, "First", 200, argmax=True)
    assert server.ok(prompt="First", max_tokens=200, top_p=1e-6, seed=2)[0]["text"] == greedy  # the top one alone
    plain = server.ok(prompt="First", max_tokens=200, seed=2)[0]["text"]
    assert server.ok(prompt="First", max_tokens=200, top_p=1, seed=2)[0]["text"] == plain  # 1 is off
    nucleus = server.ok(prompt="First", max_tokens=200, top_p=0.6, seed=2)[0]["text"]
    assert nucleus not in (plain, greedy)
    if has_top_p():
        assert nucleus == sample_cli(ckpt, "First", 200, 2, top_p=0.6)


def test_no_seed_draws_fresh_text_and_max_tokens_0(server):
    assert server.ok(prompt="A", max_tokens=100)[0]["text"] != server.ok(prompt="A", max_tokens=100)[0]["text"]
    choice, usage = server.ok(prompt="All", max_tokens=0)
    assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == ("", "length", 0)


def test_stop_string_and_list(server, ckpt):
    full = server.ok(prompt="First", max_tokens=400, seed=6)[0]["text"]
    stop = full[60:63]
    end = full.index(stop) + len(stop)
    choice, usage = server.ok(prompt="First", max_tokens=400, seed=6, stop=stop)
    assert (choice["text"], choice["finish_reason"], usage["completion_tokens"]) == (full[:end], "stop", end)
    assert choice["text"] == sample_cli(ckpt, "First", 400, 6, stop=stop)
    assert server.stream(prompt="First", max_tokens=400, seed=6, stop=stop)[:2] == (full[:end], "stop")
    stops = ["\x00never", full[150:152], stop, full[30:34]]  # the first to end cuts
    end = min(full.index(s) + len(s) for s in stops if s in full)
    choice = server.ok(prompt="First", max_tokens=400, seed=6, stop=stops)[0]
    assert (choice["text"], choice["finish_reason"]) == (full[:end], "stop")
    assert server.ok(prompt="First", max_tokens=400, seed=6, stop=["\x00never"])[0] == {
        "text": full, "index": 0, "logprobs": None, "finish_reason": "length"}


def test_echo_prepends_the_prompt(server):
    plain = server.ok(prompt="All:", max_tokens=50, seed=8)[0]["text"]
    choice, usage = server.ok(prompt="All:", max_tokens=50, seed=8, echo=True)
    assert choice["text"] == "All:" + plain and usage["completion_tokens"] == 50
    assert server.stream(prompt="All:", max_tokens=50, seed=8, echo=True)[0] == "All:" + plain


def test_a_seed_gives_the_same_text_beside_31_other_streams(server, ckpt):
    """32 streams at once, a mix of settings, streamed and not: each text equals the one its seed
    gave alone, and seed 100's equals what `charlstm sample` prints."""
    bodies = [{"prompt": ["First", "", "All:\n", "Speak"][i % 4], "max_tokens": 300 + 37 * i, "seed": 100 + i,
               "temperature": [1.0, 0.8, 1.2][i % 3], "top_k": [0, 5][i % 2], "stream": i % 3 != 0} for i in range(32)]
    alone = [server.ok(**{**b, "stream": False})[0]["text"] for b in bodies]

    async def together():
        async with aiohttp.ClientSession() as session:
            return await asyncio.gather(*(complete_async(session, server.url, b) for b in bodies))
    results = run_async(together())
    assert [r[:2] for r in results] == [(200, text) for text in alone]
    assert alone[0] == sample_cli(ckpt, "First", 300, 100, temperature=1.0)


# ---------------------------------------------------------------------------------- bad requests

def refused(reply, code, *words):
    """The reply is the contract's error: that status, {"error": {code, message, type}} naming words."""
    types = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "invalid_request_error", 503: "unavailable_error"}
    assert reply.status == code, (reply.status, reply.body)
    error = reply.json()["error"]
    assert error["code"] == code and error["type"] == types[code] and set(error) == {"code", "message", "type"}
    for word in words:
        assert re.search(word, error["message"]), (word, error["message"])
    return error["message"]


BAD = [  # (body, status or statuses, patterns the message must hold)
    (b"{not json", 400, ["JSON"]),
    (b"[1, 2]", 400, []),
    (b"", 400, []),
    (b'"prompt"', 400, []),
    ({"prompt": 5}, 400, ["prompt"]),
    ({"prompt": "a", "max_tokens": "x"}, 400, ["max_tokens"]),
    ({"prompt": "a", "max_tokens": -1}, 400, ["max_tokens"]),
    ({"prompt": "a", "max_tokens": 1.5}, 400, ["max_tokens"]),
    ({"prompt": "a", "max_tokens": True}, 400, ["max_tokens"]),
    ({"prompt": "a", "max_tokens": LIMIT + 1}, 400, ["max_tokens", str(LIMIT)]),
    ({"prompt": "a", "temperature": -1}, 400, ["temperature"]),
    ({"prompt": "a", "temperature": "hot"}, 400, ["temperature"]),
    ({"prompt": "a", "top_k": -2}, 400, ["top_k"]),
    ({"prompt": "a", "top_p": 0}, 400, ["top_p"]),
    ({"prompt": "a", "top_p": 1.5}, 400, ["top_p"]),
    ({"prompt": "a", "stop": []}, 400, ["stop"]),
    ({"prompt": "a", "stop": ""}, 400, ["stop"]),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, 400, ["stop"]),
    ({"prompt": "a", "stop": 5}, 400, ["stop"]),
    ({"prompt": "a", "seed": -1}, 400, ["seed"]),
    ({"prompt": "a", "stream": "yes"}, 400, ["stream"]),
    ({"prompt": "a", "echo": 1}, 400, ["echo"]),
    ({"prompt": "a", "frequency_penalty": 1, "best_of": 2}, 400, ["frequency_penalty", "best_of"]),
    ({"prompt": "a", "n": 2}, 400, [r"\bn\b"]),
    ({"prompt": "a", "model": "gpt-4"}, (400, 404), ["gpt-4"]),  # the contract names no status; OpenAI's is 404
    ({"prompt": "Zebra é"}, 400, ["'Z'", "'é'"]),
]


def test_every_bad_request_is_refused_and_other_streams_go_on(server):
    """A long stream runs through all the refusals and keeps its text (the prefix its seed gives)."""
    read, cut = server.open_stream(prompt="First", max_tokens=LIMIT, seed=12)
    try:
        pieces = [json.loads(next(read))["choices"][0]["text"] for _ in range(3)]
        for body, codes, words in BAD:
            reply = server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"})
            assert reply.status in (codes if isinstance(codes, tuple) else (codes,)), (body, reply.status, reply.body)
            refused(reply, reply.status, *words)
        assert server.health()["status"] == "ok"
        pieces += [json.loads(next(read))["choices"][0]["text"] for _ in range(20)]
    finally:
        cut()
    text = "".join(pieces)
    assert len(text) > 0 and text == server.ok(prompt="First", max_tokens=len(text), seed=12)[0]["text"]


def test_the_right_model_name_and_user_are_accepted(server):
    name = server.get("/v1/models").json()["data"][0]["id"]
    assert server.ok(prompt="a", max_tokens=5, seed=1, model=name, user="someone", n=1)[0]["text"] == \
        server.ok(prompt="a", max_tokens=5, seed=1)[0]["text"]


def test_a_body_over_1_mib_is_413(server):
    body = json.dumps({"prompt": "a" * (1 << 20), "max_tokens": 1}).encode()
    refused(server.request("POST", "/v1/completions", body, {"Content-Type": "application/json"}), 413)
    assert server.ok(prompt="a" * 1000, max_tokens=1)[1]["prompt_tokens"] == 1000  # under the limit: fine
    assert server.health()["status"] == "ok"


def test_prompt_characters_outside_the_vocabulary_are_named(server):
    message = refused(server.complete(prompt="All: Zed, " + OUTSIDE), 400, "'Z'", "'é'")
    assert "'A'" not in message and "'d'" not in message


# ---------------------------------------------------------------------------------- the key

@pytest.fixture(scope="module", params=["--api-key", "--api-key-file"])
def keyed(request, ckpt, tmp_path_factory):
    if request.param == "--api-key":
        s = Server(ckpt, "--api-key", "s3cret-key")
    else:
        path = tmp_path_factory.mktemp("key") / "key.txt"
        path.write_text("s3cret-key\n")  # as `echo KEY > file` writes it: the newline is not the key's
        s = Server(ckpt, "--api-key-file", path)
    yield s
    s.stop()


@pytest.mark.parametrize("path", ["/v1/models", "/api/model", "/metrics"])
def test_a_key_guards_every_api_path(keyed, path):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-key"},
                    {"Authorization": "Basic s3cret-key"}):
        refused(keyed.get(path, headers=headers), 401)
    assert keyed.get(path, headers={"Authorization": "Bearer s3cret-key"}).status == 200


def test_a_key_guards_completions_but_not_health_or_the_page(keyed):
    refused(keyed.complete(prompt="a", max_tokens=5), 401)
    refused(keyed.complete({"Authorization": "Bearer nope"}, prompt="a", max_tokens=5), 401)
    reply = keyed.complete({"Authorization": "Bearer s3cret-key"}, prompt="a", max_tokens=5)
    assert reply.status == 200 and len(reply.json()["choices"][0]["text"]) == 5
    assert keyed.health()["auth"] is True and keyed.get("/").status == 200


# ---------------------------------------------------------------------------------- going away

def test_a_client_that_goes_away_ends_its_stream(ckpt):
    s = Server(ckpt, "--max-tokens-limit", LIMIT)
    try:
        before = s.metrics()
        read, cut = s.open_stream(prompt="First", max_tokens=LIMIT, seed=1)
        for _ in range(5):
            next(read)
        assert s.metrics()["charlstm_streams_active"] == 1
        cut()
        wait_until(lambda: s.metrics()["charlstm_streams_active"] == 0, what="the stream to end")
        after = s.metrics()
        assert after["charlstm_streams_cancelled_total"] == before["charlstm_streams_cancelled_total"] + 1
        time.sleep(seconds(0.5))
        assert s.metrics()["charlstm_chars_generated_total"] == after["charlstm_chars_generated_total"]
        assert idle(s)
    finally:
        s.stop()


def test_a_full_queue_answers_503_and_a_waiting_request_runs_when_a_stream_ends(ckpt):
    s = Server(ckpt, "--max-streams", 1, "--max-queue", 1, "--max-tokens-limit", LIMIT)
    try:
        read, cut = s.open_stream(prompt="First", max_tokens=LIMIT, seed=1)
        next(read)
        waiting = {}
        second = threading.Thread(target=lambda: waiting.update(reply=s.complete(prompt="All", max_tokens=20, seed=3)))
        second.start()
        wait_until(lambda: s.health()["streams_queued"] == 1, what="the second request to queue")
        assert s.health()["streams_active"] == 1 and s.metrics()["charlstm_streams_queued"] == 1
        third = s.complete(prompt="All", max_tokens=20, seed=3)
        refused(third, 503)
        assert float(third.headers["Retry-After"]) >= 0
        assert second.is_alive()  # still waiting for the one stream
        cut()
        second.join(seconds(30))
        assert not second.is_alive() and waiting["reply"].status == 200
        assert waiting["reply"].json()["choices"][0]["text"] == s.ok(prompt="All", max_tokens=20, seed=3)[0]["text"]
        wait_until(lambda: idle(s), what="the server to be idle")
    finally:
        s.stop()


# ---------------------------------------------------------------------------------- run folders

def copy_run(run_folder, tmp_path):
    folder = tmp_path / "run"
    shutil.copytree(run_folder, folder, ignore=shutil.ignore_patterns(".lock", ".holder"))
    return folder


def test_a_run_folder_shows_its_metrics(run_folder, tmp_path):
    s = Server(copy_run(run_folder, tmp_path))
    try:
        facts = s.get("/api/model").json()
        assert facts["run_folder"] is True and facts["step"] == 40 and facts["reloads"] == 0
        run = s.get("/api/run").json()
        lines = [json.loads(line) for line in (run_folder / "metrics.jsonl").read_text().splitlines()]
        assert run == {"records": lines, "model_step": 40}
    finally:
        s.stop()


def test_a_renamed_checkpoint_is_loaded_and_a_temp_file_never_is(run_folder, tmp_path):
    """As the trainer's atomic_write does: junk in .best.npz.tmp-PID first (a file being written),
    then the whole checkpoint, then a rename over best.npz. The server must wait for the rename."""
    folder = copy_run(run_folder, tmp_path)
    shutil.copyfile(folder / "step-00000030.npz", folder / "best.npz")
    s = Server(folder)
    try:
        assert s.get("/api/model").json()["step"] == 30
        for reloads, step in [(1, 35), (2, 40)]:
            temp = folder / f".best.npz.tmp-{os.getpid()}"
            whole = (folder / f"step-{step:08d}.npz").read_bytes()
            with open(temp, "wb") as f:
                f.write(whole[:len(whole) // 2])
                f.flush()
                time.sleep(seconds(1.5))  # the server polls about once a second
                assert s.ok(prompt="All", max_tokens=30)[1]["completion_tokens"] == 30
                assert s.get("/api/model").json()["reloads"] == reloads - 1
                f.write(whole[len(whole) // 2:])
            os.replace(temp, folder / "best.npz")
            wait_until(lambda: s.get("/api/model").json()["reloads"] == reloads, what="the reload")
            assert s.get("/api/model").json()["step"] == step
            assert s.ok(prompt="All", max_tokens=30)[1]["completion_tokens"] == 30
        (folder / ".best.npz.tmp-1").write_bytes(b"junk left by a crash")
        time.sleep(seconds(1.5))
        assert s.get("/api/model").json()["reloads"] == 2 and s.metrics()["charlstm_model_reloads_total"] == 2
        assert "rror" not in s.stderr and "Traceback" not in s.stderr, s.stderr
    finally:
        s.stop()


@pytest.mark.slow
def test_a_run_folder_is_reloaded_while_training_writes_it(tmp_path):
    """A run that finds a better model at every evaluation (a low lr, no decay, no dropout) writes
    best.npz ~20 times a second for 10 s; completions asked all the while each succeed, whole."""
    slow_learner = ["--dropout", "0", "--lr-decay", "1", "--lr", "0.00005"]
    folder = train_tiny(tmp_path, "run", "--steps", 100, "--eval-every", 100, "--save-every", 100, *slow_learner)
    s = Server(folder)
    resume = ["--resume", folder / "latest.npz", "--steps", 10**8, "--time-limit", 10, "--quiet"]
    trainer = subprocess.Popen([sys.executable, "-m", "charlstm", "train", *map(str, resume)], env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        steps, answers = [s.get("/api/model").json()["step"]], []
        while trainer.poll() is None:
            steps.append(s.get("/api/model").json()["step"])
            answers.append(s.ok(prompt="First", max_tokens=40)[1]["completion_tokens"])
            answers.append(len(s.stream(prompt="All", max_tokens=40)[0]))
        assert trainer.wait() == 0, trainer.stderr.read()
        final = json.loads(charlstm("info", "--json", folder / "best.npz").stdout)["step"]
        wait_until(lambda: s.get("/api/model").json()["step"] == final, timeout=5, what="the last best.npz")
        facts = s.get("/api/model").json()
        assert facts["reloads"] >= 1 and steps == sorted(steps) and final > steps[0] == 100
        assert len(answers) > 10 and set(answers) == {40}
        assert "Traceback" not in s.stderr, s.stderr
    finally:
        if trainer.poll() is None:
            trainer.kill()
        s.stop()


# ---------------------------------------------------------------------------------- the command

@pytest.mark.parametrize("case", ["missing", "not a checkpoint", "empty folder", "missing key file"])
def test_bad_serve_arguments_are_one_line(tmp_path, ckpt, case):
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    (tmp_path / "empty").mkdir()
    source, options, word = {
        "missing": (tmp_path / "nothing.npz", [], "nothing.npz"),
        "not a checkpoint": (tmp_path / "notes.txt", [], "notes.txt"),
        "empty folder": (tmp_path / "empty", [], "empty"),
        "missing key file": (ckpt, ["--api-key-file", tmp_path / "no-key.txt"], "no-key.txt"),  # all else fine
    }[case]
    done = charlstm("serve", source, "--port", 0, *options, timeout=60)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode != 0 and len(lines) == 1 and lines[0].startswith("Error: "), done.stderr
    assert word in lines[0] and "No such command" not in lines[0] and "Traceback" not in done.stderr


@pytest.mark.skipif(sys.platform == "win32", reason="Windows aims Ctrl-C at a console, not a process")
def test_sigint_stops_the_server_cleanly(ckpt):
    s = Server(ckpt)
    assert s.ok(prompt="a", max_tokens=3)[1]["completion_tokens"] == 3
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(seconds(30)) == 0 and "Traceback" not in s.stderr
