#!/usr/bin/env python3
"""Load on `charlstm serve`: many streams against one, and against `charlstm sample` processes.

    python benchmarks/serve_load.py [--checkpoint checkpoints/tinyshakespeare/best.npz] [--clients 32]
                                    [--tokens 500] [--seconds 20] [--threads N] [--precision f32|bf16]
    python benchmarks/serve_load.py --robustness [--requests 1000]
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 ...   # a server already running

It starts `charlstm serve` on 127.0.0.1 and a free port (unless --url), then
  (a) --clients streams at once, each client asking for streamed completions of --tokens characters
      with a short prime, one after another, until --seconds have passed (requests in flight then
      finish: the run ends by itself): aggregate chars/s; per request the time to its first
      generated character and the time per character after it, p50 and p99;
  (b) one client alone, the same way, for a third of --seconds: chars/s;
  (c) `charlstm sample` in one process, and --clients processes at once (each --threads 1): chars/s
      from two lengths run each way, differenced, so process start and kernel loading cancel out;
and prints a markdown table with the CPU, threads and model shape, and the ratios.
--robustness instead sends --requests requests, 32 at a time: a tenth bad (each kind of bad input
in turn), 5% cut off mid-stream, the rest good; it checks there is no 5xx, every good text is
whole (max_tokens characters unless a stop string ended it), the server still answers, and prints
its RSS after the first 100 requests and at the end. Exit 1 when a check fails.
Prints numbers; run it on a quiet machine (never beside another benchmark).
"""
import argparse
import asyncio
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
PRIMES = ["ROMEO:", "First Citizen:\n", "KING", "\n", "The ", "What"]
BAD = [b"{not json", b"[1, 2]", b"", {"prompt": 5}, {"max_tokens": "x"}, {"temperature": -1}, {"top_p": 0},
       {"top_p": 1.5}, {"stop": []}, {"stop": ["a", "b", "c", "d", "e"]}, {"seed": -1}, {"colour": "red"},
       {"n": 2}, {"model": "no-such-model"}, {"prompt": "\x00\x01"}, {"max_tokens": 10**9},
       {"prompt": "a" * (1 << 20)}]


def cpu_name():
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def start_server(args, max_streams):
    """A `charlstm serve` process and its URL, read from the startup line on its stderr."""
    command = [sys.executable, "-m", "charlstm", "serve", args.checkpoint, "--host", "127.0.0.1", "--port", "0",
               "--max-streams", str(max_streams), "--max-queue", "1024", "--max-tokens-limit", str(10**6),
               "--precision", args.precision] + (["--threads", str(args.threads)] if args.threads else [])
    proc = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=ENV)
    for line in proc.stderr:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        if found:
            threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep the pipe drained
            return proc, f"http://127.0.0.1:{found.group(1)}"
    raise SystemExit(f"the server exited ({proc.wait()}) before it printed its address")


def rss_mib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024


def pct(values, q):
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))] if values else float("nan")


async def stream_one(session, url, body, cut_after=None):
    """One streamed completion: (status, text, finish_reason, seconds to the first generated
    character, seconds per character after it). cut_after: close the connection after that many events."""
    start, first, text, finish, n = time.perf_counter(), None, "", None, 0
    async with session.post(url + "/v1/completions", json={**body, "stream": True}) as r:
        if r.status != 200:
            return r.status, await r.text(), None, None, None
        async for line in r.content:
            line = line.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            choice = json.loads(line[5:])["choices"][0]
            if choice["text"] and first is None:
                first = time.perf_counter()
            text, finish, n = text + choice["text"], choice["finish_reason"] or finish, n + 1
            if cut_after is not None and n >= cut_after:
                r.close()
                return 200, text, "cut", None, None
    end = time.perf_counter()
    per_char = (end - first) / (len(text) - 1) if first and len(text) > 1 else None
    return 200, text, finish, (first or end) - start, per_char


async def load(url, clients, tokens, seconds, primes):
    """Each client streams completions one after another until `seconds` have passed."""
    results, deadline = [], time.perf_counter() + seconds

    async def client(k):
        rng = random.Random(k)
        while time.perf_counter() < deadline:
            body = {"prompt": rng.choice(primes), "max_tokens": tokens, "seed": rng.randrange(2**31)}
            results.append(await stream_one(session, url, body))
    start = time.perf_counter()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session:
        await asyncio.wait_for(asyncio.gather(*(client(k) for k in range(clients))), seconds * 10 + 600)
    elapsed = time.perf_counter() - start
    failed = sum(r[0] != 200 for r in results)
    return {"chars/s": sum(len(r[1]) for r in results if r[0] == 200) / elapsed, "requests": len(results),
            "failed": failed, "ttfc": [r[3] for r in results if r[3] is not None],
            "tpc": [r[4] for r in results if r[4] is not None]}


def sample_rate(args, prime, processes, short, extra):
    """Aggregate chars/s of `processes` `charlstm sample` runs at once, from the wall times of
    lengths short and short + extra (process start and kernel loading cancel out)."""
    threads = ["--threads", "1"] if processes > 1 else (["--threads", str(args.threads)] if args.threads else [])

    def wall(length):
        command = [sys.executable, "-m", "charlstm", "sample", args.checkpoint, "--prime", prime, "--seed", "1",
                   "--length", str(length), "--precision", args.precision, *threads]
        start = time.perf_counter()
        procs = [subprocess.Popen(command, stdout=subprocess.DEVNULL, env=ENV) for _ in range(processes)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"`{' '.join(command)}` failed")
        return time.perf_counter() - start
    wall(short)  # warm the caches
    return processes * extra / max(wall(short + extra) - wall(short), 1e-9)


def benchmark(args, url, model):
    primes = [p for p in PRIMES if set(p) <= set(model["vocab"])] or [""]
    print(f"(a) {args.clients} clients for {args.seconds:g} s...", file=sys.stderr)
    many = load_or_exit(url, args.clients, args.tokens, args.seconds, primes)
    print(f"(b) one client for {args.seconds / 3:.3g} s...", file=sys.stderr)
    one = load_or_exit(url, 1, args.tokens, args.seconds / 3, primes)
    print("(c) charlstm sample, 1 process and then at once...", file=sys.stderr)
    extra = max(1000, int(one["chars/s"] * 4))  # about 4 s more for one process
    alone = sample_rate(args, primes[0], 1, 200, extra)
    # K processes start (each loading its kernels) for seconds on 2 cores and that time varies by a
    # second or two, so each generates about 12 s of the machine's time more than the short run
    crowd = sample_rate(args, primes[0], args.clients, 200, max(1000, 3 * extra // args.clients))
    ms = lambda s: f"{1e3 * s:.3f} ms"
    print(f"\nCPU: {cpu_name()}, {os.cpu_count()} logical CPUs; server --threads {args.threads or 'default'}, "
          f"--precision {args.precision}; {time.strftime('%Y-%m-%d')}")
    print(f"model: {model['id']} {model['layers']}x{model['hidden']} LSTM, vocab {model['vocab_size']}, "
          f"{model['parameters']:,} parameters; {args.tokens} characters per request\n")
    print("| what | chars/s | time to first char p50 / p99 | time per char p50 / p99 |")
    print("|---|---:|---|---|")
    for name, r in [(f"server, {args.clients} streams", many), ("server, 1 stream", one)]:
        print(f"| {name} ({r['requests']} requests, {r['failed']} failed) | {r['chars/s']:,.0f} | "
              f"{ms(pct(r['ttfc'], 50))} / {ms(pct(r['ttfc'], 99))} | {ms(pct(r['tpc'], 50))} / {ms(pct(r['tpc'], 99))} |")
    print(f"| charlstm sample, 1 process | {alone:,.0f} | | |")
    print(f"| charlstm sample, {args.clients} processes at once (--threads 1 each) | {crowd:,.0f} | | |")
    print(f"\n{args.clients} streams / 1 stream: {many['chars/s'] / one['chars/s']:.2f}x; "
          f"1 stream via the server / sample: {one['chars/s'] / alone:.2f}x; "
          f"{args.clients} streams / {args.clients} sample processes: {many['chars/s'] / crowd:.2f}x")


def load_or_exit(*a):
    result = asyncio.run(load(*a))
    if not result["requests"] or result["failed"] == result["requests"]:
        raise SystemExit("every request failed: is the server the one you meant?")
    return result


def robustness_plan(count, tokens, vocab, rng):
    """(kind, body) for each request: 10% bad, 5% cut mid-stream, the rest good (some with a stop)."""
    plan = []
    for i in range(count):
        if i % 10 == 5:
            bad = BAD[(i // 10) % len(BAD)]
            plan.append(("bad", bad if isinstance(bad, bytes) else {"prompt": "a", **bad}))
        elif i % 20 == 7:
            plan.append(("cut", {"prompt": "", "max_tokens": 10**6, "seed": i}))
        else:
            body = {"prompt": "".join(rng.choice(vocab) for _ in range(rng.randrange(0, 20))), "max_tokens": tokens,
                    "seed": i, "temperature": rng.choice([0, 0.5, 1.0]), "stream": rng.random() < 0.5}
            if i % 7 == 0:
                body["stop"] = rng.choice(vocab)
            plan.append(("good", body))
    return plan


async def robustness(url, pid, count, tokens, vocab):
    rng, problems, rss, done = random.Random(0), [], {}, [0]
    plan, gate = robustness_plan(count, tokens, vocab, rng), asyncio.Semaphore(32)

    async def one(session, kind, body):
        async with gate:
            try:
                await check(session, kind, body)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:
                problems.append(f"{kind} {str(body)[:60]}: {e!r}")
        done[0] += 1
        if done[0] == 100 and pid:
            rss["first 100"] = rss_mib(pid)

    async def check(session, kind, body):
        if kind == "bad":
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            async with session.post(url + "/v1/completions", data=data) as r:
                ok = 400 <= r.status < 500 and "error" in json.loads(await r.text())
                problems.extend([] if ok else [f"bad input {str(body)[:60]} -> {r.status}"])
        elif kind == "cut":
            status = (await stream_one(session, url, body, cut_after=3))[0]
            problems.extend([] if status == 200 else [f"cut stream -> {status}"])
        else:
            status, text, finish, _, _ = (await stream_one(session, url, body)) if body["stream"] else \
                await plain(session, url, body)
            whole = status == 200 and (len(text) == tokens if finish == "length" else
                                       finish == "stop" and text.endswith(body.get("stop", "\x00")))
            problems.extend([] if whole else [f"{json.dumps(body)[:80]} -> {status} {finish} {len(text)} chars"])

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=300)) as session:
        await asyncio.gather(*(one(session, kind, body) for kind, body in plan))
        async with session.get(url + "/health") as r:
            problems.extend([] if r.status == 200 else [f"/health -> {r.status} at the end"])
    if pid:
        rss["end"] = rss_mib(pid)
    return problems, rss


async def plain(session, url, body):
    async with session.post(url + "/v1/completions", json=body) as r:
        if r.status != 200:
            return r.status, await r.text(), None, None, None
        choice = (await r.json())["choices"][0]
        return 200, choice["text"], choice["finish_reason"], None, None


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "checkpoints" / "tinyshakespeare" / "best.npz"))
    p.add_argument("--url", help="a server already running (no RSS then)")
    p.add_argument("--clients", type=int, default=32)
    p.add_argument("--tokens", type=int, default=500, help="characters each request asks for")
    p.add_argument("--seconds", type=float, default=20, help="how long the many-clients phase sends requests")
    p.add_argument("--threads", type=int, help="the server's --threads (default: its own)")
    p.add_argument("--precision", choices=("f32", "bf16"), default="f32")
    p.add_argument("--robustness", action="store_true", help="the robustness run instead of the benchmark")
    p.add_argument("--requests", type=int, default=1000, help="requests of the robustness run")
    args = p.parse_args()
    if not args.url and not Path(args.checkpoint).exists():
        print(f"no checkpoint at {args.checkpoint}: train one (charlstm train) or pass --checkpoint", file=sys.stderr)
        sys.exit(2)
    proc, url = start_server(args, max(32, args.clients)) if not args.url else (None, args.url.rstrip("/"))
    try:
        model = json.loads(urlopen(url + "/api/model"))
        if not args.robustness:
            return benchmark(args, url, model)
        problems, rss = asyncio.run(robustness(url, proc and proc.pid, args.requests, args.tokens, model["vocab"]))
        if rss:
            first, end = rss["first 100"], rss["end"]
            print(f"server RSS: {first:.1f} MiB after the first 100 requests, {end:.1f} MiB at the end "
                  f"({100 * (end - first) / first:+.1f}%)")
        alive = proc is None or proc.poll() is None
        kinds = [kind for kind, _ in robustness_plan(args.requests, args.tokens, model["vocab"], random.Random(0))]
        print(f"{args.requests} requests ({kinds.count('good')} good, {kinds.count('bad')} bad, "
              f"{kinds.count('cut')} cut off mid-stream): {len(problems)} problems; server {'alive' if alive else 'DEAD'}")
        if alive:  # the server's own count of answers by status (499: the client went first)
            codes = re.findall(r'charlstm_requests_total\{code="(\d+)"\} (\d+)', urlopen(url + "/metrics").decode())
            print("server's answers by status: " + ", ".join(f"{code}: {n}" for code, n in codes))
        for line in problems[:20]:
            print("  " + line)
        sys.exit(0 if alive and not problems else 1)
    finally:
        if proc:
            proc.terminate()
            proc.wait(30)


def urlopen(url):
    import urllib.request
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.read()


if __name__ == "__main__":
    main()
