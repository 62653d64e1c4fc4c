#!/usr/bin/env python3
"""Structured outputs: the order-extraction task's dev cases, zero-shot, greedy,
answered by `minnow serve` with the task's JSON Schema (`response_format`
json_schema) and without, side by side in one run.

Per mode and client count: completion tokens per second of wall time, forward
passes per answer (from /metrics: `minnow_steps_total`), field accuracy and
exact answers (the task README's scoring), and the share of answers that parse.

    python3 bench/structured_outputs.py                        # qwen2.5-coder-0.5b, 1 and 16 clients
    python3 bench/structured_outputs.py --model smollm2-135m --clients 1 --cases 40
    python3 bench/structured_outputs.py --llama-server ~/.cache/minnow/llama.cpp/*/build/bin/llama-server
    python3 bench/structured_outputs.py --prefix-cache          # minnow's prefix cache on, a server per mode

With --llama-server, llama.cpp's server answers the same cases with the same schema
(`response_format` json_schema, which it turns into a GBNF grammar), on the same GGUF
file, threads, slots and context per slot, and the table gains its rows and the
minnow ÷ llama-server ratios (build it with
`LLAMACPP_TARGETS=llama-server bench/compare-llamacpp.sh --build-only`).
"""

import argparse
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASK = os.path.join(REPO, "..", "shared", "tasks", "order-extraction")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(port, path, body):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


def metrics(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=60) as r:
        return {l.split()[0]: float(l.split()[1]) for l in r.read().decode().splitlines() if l and l[0] != "#"}


def first_object(text):
    m = re.search(r"\{.*\}", text, re.S)
    if not m:
        return None
    try:
        v = json.loads(m.group(0))
    except ValueError:
        return None
    return v if isinstance(v, dict) else None


def same(a, b):
    if isinstance(b, (int, float)) and not isinstance(b, bool):
        try:
            return float(a) == float(b)
        except (TypeError, ValueError):
            return False
    return isinstance(a, str) and a.strip().lower() == str(b).strip().lower()


def score(reply, gold):
    v = first_object(reply)
    if v is None:
        return 0, False, False
    right = sum(1 for k, g in gold.items() if k in v and same(v[k], g))
    return right, right == len(gold), True


def constrain(body, mode, schema):
    """The request body for `mode`: free, schema (response_format json_schema),
    or compact (vLLM's structured_outputs json with disable_any_whitespace)."""
    if mode == "schema":
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "order", "schema": schema, "strict": True}}
    elif mode == "compact":
        body["structured_outputs"] = {"json": schema, "disable_any_whitespace": True}
    return body


def run(port, cases, clients, schema, mode, minnow=True):
    results = [None] * len(cases)
    nxt = [0]
    lock = threading.Lock()

    def worker():
        while True:
            with lock:
                i = nxt[0]
                nxt[0] += 1
            if i >= len(cases):
                return
            body = {"messages": [{"role": "user", "content": cases[i]["prompt"]}], "temperature": 0,
                    "max_tokens": 200}
            r = post(port, "/v1/chat/completions", constrain(body, mode, schema))
            results[i] = (r["choices"][0]["message"]["content"], r["usage"]["completion_tokens"])

    m0 = metrics(port) if minnow else None
    t0 = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if minnow:
        m1 = metrics(port)
        passes = m1["minnow_steps_total"] - m0["minnow_steps_total"]
        busy = m1["minnow_busy_seconds_total"] - m0["minnow_busy_seconds_total"]
        mask = m1["minnow_mask_seconds_total"] - m0["minnow_mask_seconds_total"]
    else:
        passes = busy = mask = float("nan")
    tokens = sum(r[1] for r in results)
    right = exact = parsed = 0
    for (reply, _), c in zip(results, cases):
        r, e, p = score(reply, c["answer"])
        right += r
        exact += e
        parsed += p
    n = len(cases)
    return {"tok_s": tokens / wall, "answers_s": n / wall, "tokens_per_answer": tokens / n, "passes_per_answer": passes / n,
            "field_accuracy": right / (6 * n), "exact": exact / n, "parsed": parsed / n, "wall_s": wall,
            "mask_share": mask / wall, "mask_ms_per_pass": 1000 * mask / max(passes, 1), "busy_s": busy}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--clients", default="1,16")
    ap.add_argument("--cases", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--minnow-bin", default=os.path.join(REPO, "target/release/minnow"))
    ap.add_argument("--modes", default="free,schema,compact")
    ap.add_argument("--serve-arg", action="append", default=[], help="more `minnow serve` arguments (repeatable)")
    ap.add_argument("--llama-server", help="llama.cpp's llama-server binary: answer with it too")
    ap.add_argument("--prefix-cache", action="store_true",
                    help="minnow with its prefix cache on (as it serves by default, and as llama-server reuses a "
                         "slot's prompt), a fresh server for every mode and client count so that no mode reuses "
                         "another's prompts, each warmed with the task's instruction on a made-up message")
    args = ap.parse_args()
    cases = [json.loads(l) for l in open(os.path.join(TASK, "dev.jsonl")) if l.strip()][: args.cases]
    schema = json.load(open(os.path.join(TASK, "schema.json")))
    ms = [] if args.prefix_cache else [(args.model, start_minnow(args), True)]
    if args.llama_server:
        ms.append(("llama-server", start_llama_server(args), False))
    try:
        for _, (port, _), minnow in ms:
            run(port, cases[:2], 1, schema, "schema", minnow)  # warm up (and compile the vocabulary's trie)
        cache = ("minnow's prefix cache on, a fresh server per mode and client count" if args.prefix_cache
                 else "no prefix cache in minnow")
        print(f"\n{args.model}, {len(cases)} dev cases, zero-shot, greedy, {args.threads} threads, 16 slots, "
              f"{cache}\n")
        print("| clients | server | mode | completion tok/s | answers/s | tokens / answer | forward passes / answer "
              "| parsed | field acc | exact | mask time (share of wall, ms per pass) |")
        print("|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
        modes = args.modes.split(",")
        for c in [int(x) for x in args.clients.split(",")]:
            rows = {}
            runs = [(name, port, minnow, mode) for name, (port, _), minnow in ms
                    for mode in (modes if minnow else [m for m in modes if m == "schema"])]
            if args.prefix_cache:
                runs = [(args.model, None, True, mode) for mode in modes] + runs
            for name, port, minnow, mode in runs:
                fresh = None
                if port is None:
                    fresh = start_minnow(args, prefix_cache=True)
                    port = fresh[0]
                    run(port, [warm_case(cases)], 1, schema, mode)
                try:
                    r = rows[(name, mode)] = run(port, cases, c, schema, mode, minnow)
                finally:
                    if fresh:
                        fresh[1].terminate()
                        fresh[1].wait()
                print(f"| {c} | {name} | {mode} | {r['tok_s']:.1f} | {r['answers_s']:.2f} | "
                      f"{r['tokens_per_answer']:.1f} | {r['passes_per_answer']:.1f} | {r['parsed']:.2f} | "
                      f"{r['field_accuracy']:.3f} | {r['exact']:.2f} | {100 * r['mask_share']:.1f}%, "
                      f"{r['mask_ms_per_pass']:.2f} |", flush=True)
            base = rows[(args.model, modes[0])]
            for mode in modes[1:]:
                r = rows[(args.model, mode)]
                print(f"| {c} | {args.model} | {mode} ÷ {modes[0]} | {r['tok_s'] / base['tok_s']:.2f}× | "
                      f"{r['answers_s'] / base['answers_s']:.2f}× | | | | | | |")
            if args.llama_server:
                ref = rows[("llama-server", "schema")]
                for mode in modes:
                    if mode == "free":
                        continue
                    r = rows[(args.model, mode)]
                    print(f"| {c} | minnow {mode} ÷ llama-server schema | | {r['tok_s'] / ref['tok_s']:.2f}× | "
                          f"{r['answers_s'] / ref['answers_s']:.2f}× | | | | | | |", flush=True)
    finally:
        for _, (_, proc), _ in ms:
            proc.terminate()
            proc.wait()


def wait_ready(port, proc):
    for _ in range(1200):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
            return
        except OSError:
            if proc.poll() is not None:
                sys.exit("the server exited")
            time.sleep(0.5)
    sys.exit("the server did not start")


def warm_case(cases):
    """A request with the task's instruction (the prompts' shared prefix) on
    a message that is not a dev case, so a fresh server's prefix cache holds
    what steady serving would, and none of the measured cases."""
    head, sep, _ = cases[0]["prompt"].partition("Message:")
    msg = " Ana Lima here, 3 desk lamps at 20 EUR each to Porto by 2025-01-02."
    return {"prompt": head + sep + msg if sep else "Extract the order: 3 lamps to Porto.", "answer": {}}


def start_minnow(args, prefix_cache=False):
    port = free_port()
    # Without --prefix-cache: no prefix cache, so each mode's prompts are
    # prefilled, not reused from the mode run before it on this one server.
    cache = [] if prefix_cache else ["--prefix-cache-mb", "0"]
    proc = subprocess.Popen([args.minnow_bin, "serve", args.model, "--port", str(port), "--parallel", "16",
                             "--threads", str(args.threads), "--ctx", "1024"] + cache
                            + args.serve_arg, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    return port, proc


def start_llama_server(args):
    path = subprocess.run([args.minnow_bin, "pull", args.model], capture_output=True, text=True,
                          check=True).stdout.strip().splitlines()[-1]
    port = free_port()
    # 16 slots of 1,024 tokens each (-c is the total), the same threads.
    proc = subprocess.Popen([args.llama_server, "-m", path, "--port", str(port), "-np", "16", "-c", "16384",
                             "-t", str(args.threads), "-tb", str(args.threads), "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(port, proc)
    return port, proc


if __name__ == "__main__":
    main()
