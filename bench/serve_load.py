#!/usr/bin/env python3
"""Load test: `minnow serve` against llama.cpp's `llama-server`, same model,
same prompts, 1, 4 and 16 concurrent streaming clients.

    python3 bench/serve_load.py                          # SmolLM2-135M, both servers
    python3 bench/serve_load.py --clients 1,4,16 --requests 2 --max-tokens 64
    python3 bench/serve_load.py --only minnow            # no llama-server needed
    python3 bench/serve_load.py --minnow-url http://127.0.0.1:8080   # a server already running

Each engine is started on a free loopback port with 16 parallel slots and the
same threads (`minnow serve --parallel 16`, `llama-server -np 16`), warmed up
with one request, then for each client count C: C threads each send
--requests streaming chat completions one after another (greedy,
`ignore_eos`, exactly --max-tokens tokens each, a different prompt per
request), all starting together. Reported per run: total generated tokens per
second of wall time (all clients together), and the median (p50) and 95th
percentile (p95) of time to first token, measured at the client from sending
the request to receiving the first text. The engines run one after the other,
never at once, so each has the machine to itself.

llama-server: --llama-server PATH, else $LLAMA_SERVER, else the build that
bench/compare-llamacpp.sh makes (`LLAMACPP_TARGETS=llama-server
bench/compare-llamacpp.sh --build-only`) under ~/.cache/minnow/llama.cpp.

Adapters mode (`--adapters A.gguf,B.gguf,...`, llama.cpp's LoRA GGUF, e.g. from
`minnow distill train --lora-rank 16 --adapter-out`): both servers load every
adapter (`minnow serve --lora a0=A.gguf ...`; `llama-server
--lora-init-without-apply --lora A.gguf ...`) and each client count runs twice:
every client on the base model, then client i on adapter i mod the number of
adapters (minnow: `"model": "a<i>"`; llama-server: `"lora": [{"id": i,
"scale": 1}]`, which it batches only with requests of the same adapters). The
table gains the mode and the ratio of the two.

Only loopback addresses are contacted; every loop is bounded.
"""

import argparse
import glob
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TOPICS = [
    "the sea", "mountains", "a cat", "bread", "the moon", "trains", "music", "winter",
    "a library", "coffee", "rain", "bicycles", "the desert", "bees", "a lighthouse", "chess",
    "gardens", "clocks", "snow", "rivers", "owls", "maps", "candles", "bridges",
    "volcanoes", "kites", "forests", "markets", "ships", "stars", "apples", "storms",
]


def models_dir():
    if os.environ.get("MINNOW_MODELS"):
        return os.environ["MINNOW_MODELS"]
    if os.environ.get("XDG_CACHE_HOME"):
        return os.path.join(os.environ["XDG_CACHE_HOME"], "minnow/models")
    return os.path.expanduser("~/.cache/minnow/models")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_llama_server(arg):
    if arg:
        return arg
    if os.environ.get("LLAMA_SERVER"):
        return os.environ["LLAMA_SERVER"]
    base = os.environ.get("MINNOW_LLAMACPP_DIR", os.path.expanduser("~/.cache/minnow/llama.cpp"))
    found = sorted(glob.glob(os.path.join(base, "*", "build", "bin", "llama-server")))
    return found[-1] if found else None


def wait_healthy(port, proc, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError("the server did not become healthy")


def one_request(port, topic, max_tokens, results, lock, extra=None):
    body = json.dumps({**(extra or {}),
        "messages": [{"role": "user", "content": f"Write a long story about {topic}."}],
        "temperature": 0,
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    })
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {resp.read()[:300]!r}")
    ttft = None
    pieces = 0
    usage = None
    while True:
        line = resp.readline()
        if not line:
            break
        line = line.strip()
        if not line.startswith(b"data: "):
            continue
        data = line[6:]
        if data == b"[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"]
        for ch in ev.get("choices") or []:
            if (ch.get("delta") or {}).get("content"):
                if ttft is None:
                    ttft = time.perf_counter() - t0
                pieces += 1
    total = time.perf_counter() - t0
    conn.close()
    tokens = usage["completion_tokens"] if usage else pieces
    with lock:
        results.append((ttft if ttft is not None else total, tokens, total))


def run_level(port, clients, requests, max_tokens, extra_for=lambda i: None):
    results, lock, errors = [], threading.Lock(), []
    barrier = threading.Barrier(clients)

    def client(i):
        try:
            barrier.wait()
            for r in range(requests):
                topic = TOPICS[(i * requests + r) % len(TOPICS)]
                one_request(port, topic, max_tokens, results, lock, extra_for(i))
        except Exception as e:  # reported after the run
            errors.append(repr(e))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} requests failed: {errors[0]}")
    ttfts = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    p95 = ttfts[min(len(ttfts) - 1, max(0, int(round(0.95 * len(ttfts))) - 1))]
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall_s": wall,
            "tok_s": tokens / wall, "ttft_p50": statistics.median(ttfts), "ttft_p95": p95}


def start_minnow(args, model, port):
    binary = args.minnow_bin or os.path.join(REPO, "target/release/minnow")
    if not os.path.exists(binary):
        sys.exit(f"{binary} not found: cargo build --release -p minnow")
    cmd = [binary, "serve", model, "--port", str(port), "--parallel", "16", "--threads", str(args.threads),
           "--ctx", str(args.ctx)]
    for i, a in enumerate(args.adapter_list):
        cmd += ["--lora", f"a{i}={a}"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_llama(args, model, port):
    binary = find_llama_server(args.llama_server)
    if not binary or not os.path.exists(binary):
        sys.exit("llama-server not found: build it with `LLAMACPP_TARGETS=llama-server bench/compare-llamacpp.sh "
                 "--build-only`, or pass --llama-server PATH (or --only minnow)")
    # -c is the total context, split evenly over the -np slots.
    cmd = [binary, "-m", model, "--host", "127.0.0.1", "--port", str(port), "-np", "16", "-t", str(args.threads),
           "-c", str(16 * args.ctx), "--cont-batching", "--no-webui"]
    if args.adapter_list:
        cmd.append("--lora-init-without-apply")
        for a in args.adapter_list:
            cmd += ["--lora", a]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def bench_engine(name, start, args, model, levels, url=None):
    proc = None
    if url:
        port = int(url.rstrip("/").rsplit(":", 1)[1])
    else:
        port = free_port()
        proc = start(args, model, port)
    try:
        wait_healthy(port, proc)
        one_request(port, "warming up", 8, [], threading.Lock())
        rows = []
        k = len(args.adapter_list)
        if name == "minnow":
            spread = lambda i: {"model": f"a{i % k}"}
        else:
            spread = lambda i: {"lora": [{"id": i % k, "scale": 1.0}]}
        modes = [("base", lambda i: None)] + ([(f"{k} adapters", spread)] if k else [])
        for c in levels:
            for mode, extra in modes:
                r = run_level(port, c, args.requests, args.max_tokens, extra)
                r["engine"], r["mode"] = name, mode
                print(f"  {name:6} {c:3} clients, {mode}: {r['tok_s']:7.1f} tok/s, TTFT p50 {r['ttft_p50']:.3f} s, "
                      f"p95 {r['ttft_p95']:.3f} s ({r['requests']} requests, {r['wall_s']:.1f} s)", file=sys.stderr)
                rows.append(r)
        return rows
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.join(models_dir(), "smollm2-135m-instruct-q4_1.gguf"))
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=1024, help="context per slot")
    ap.add_argument("--only", choices=["minnow", "llama"])
    ap.add_argument("--minnow-bin")
    ap.add_argument("--llama-server")
    ap.add_argument("--minnow-url", help="use this running minnow server (loopback) instead of starting one")
    ap.add_argument("--llama-url", help="use this running llama-server (loopback) instead of starting one")
    ap.add_argument("--json", help="also write the rows to this file")
    ap.add_argument("--adapters", default="", help="comma-separated LoRA GGUF files: the adapters mode")
    args = ap.parse_args()
    args.adapter_list = [os.path.abspath(a) for a in args.adapters.split(",") if a]
    if not os.path.exists(args.model):
        sys.exit(f"{args.model} is missing: run `minnow pull all`")
    for u in (args.minnow_url, args.llama_url):
        if u and not (u.startswith("http://127.") or u.startswith("http://localhost")):
            sys.exit("only loopback servers may be load-tested")
    levels = [int(c) for c in args.clients.split(",")]
    rows = []
    if args.only != "llama":
        print("minnow serve:", file=sys.stderr)
        rows += bench_engine("minnow", start_minnow, args, args.model, levels, args.minnow_url)
    if args.only != "minnow":
        print("llama-server:", file=sys.stderr)
        rows += bench_engine("llama", start_llama, args, args.model, levels, args.llama_url)

    print(f"\nModel {os.path.basename(args.model)}, {args.threads} threads, 16 slots, greedy, "
          f"{args.max_tokens} tokens per request, {args.requests} requests per client\n")
    print("| engine | mode | clients | generated tok/s | TTFT p50 (s) | TTFT p95 (s) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['mode']} | {r['clients']} | {r['tok_s']:.1f} | {r['ttft_p50']:.3f} | "
              f"{r['ttft_p95']:.3f} |")
    by = {(r["engine"], r["mode"], r["clients"]): r for r in rows}
    modes = sorted({r["mode"] for r in rows}, key=lambda m: m != "base")
    if any(e == "llama" for e, _, _ in by) and any(e == "minnow" for e, _, _ in by):
        print("\n| mode | clients | throughput minnow ÷ llama | TTFT p95 minnow ÷ llama |")
        print("|---|---:|---:|---:|")
        for mode in modes:
            for c in levels:
                m, l = by.get(("minnow", mode, c)), by.get(("llama", mode, c))
                if m and l:
                    print(f"| {mode} | {c} | {m['tok_s'] / l['tok_s']:.2f}× | {m['ttft_p95'] / l['ttft_p95']:.2f}× |")
    if len(modes) > 1:
        print("\n| engine | clients | adapters ÷ base throughput |")
        print("|---|---:|---:|")
        for e in sorted({r["engine"] for r in rows}):
            for c in levels:
                b, a = by.get((e, "base", c)), by.get((e, modes[1], c))
                if a and b:
                    print(f"| {e} | {c} | {a['tok_s'] / b['tok_s']:.2f}× |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
