#!/usr/bin/env python3
"""Production traffic, as an application would send it: task requests to a
served model through the official `openai` client, with `store=True` and
`metadata={"task": "orders"}`, plus some unrelated chat (`{"task": "chat"}`)
that the distillation filter must leave out.

    python3 send_traffic.py --base-url http://127.0.0.1:8080/v1 --inputs inputs.jsonl --orders 64 --chat 8

Prints one line at the end: how many completions the server now stores for
each task (read back with `client.chat.completions.list`)."""

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

CHAT = [
    "Write one sentence about the sea.",
    "What is a good name for a cat?",
    "Give me a two-word slogan for a bakery.",
    "Say hello in French.",
    "Name a color of the rainbow.",
    "What rhymes with moon?",
    "Suggest a title for a short story about trains.",
    "Describe winter in five words.",
]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--base-url", required=True)
    ap.add_argument("--inputs", required=True, help="the task's unlabeled inputs (JSONL with prompt)")
    ap.add_argument("--orders", type=int, default=64)
    ap.add_argument("--chat", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=4)
    a = ap.parse_args()

    client = openai.OpenAI(base_url=a.base_url, api_key=os.environ.get("MINNOW_API_KEY", "none"), max_retries=3, timeout=600)
    model = client.models.list().data[0].id
    with open(a.inputs) as f:
        prompts = [json.loads(line)["prompt"] for line in f if line.strip()][: a.orders]
    if len(prompts) < a.orders:
        sys.exit(f"{a.inputs} has {len(prompts)} inputs, fewer than --orders {a.orders}")
    requests = [(p, "orders") for p in prompts] + [(CHAT[i % len(CHAT)], "chat") for i in range(a.chat)]

    def send(req):
        prompt, task = req
        r = client.chat.completions.create(
            model=model,
            messages=[{"role": "user", "content": prompt}],
            temperature=0,
            max_tokens=a.max_tokens,
            store=True,
            metadata={"task": task},
        )
        return r.choices[0].finish_reason

    with ThreadPoolExecutor(a.concurrency) as pool:
        finishes = list(pool.map(send, requests))
    stored = {t: sum(1 for _ in client.chat.completions.list(metadata={"task": t}, limit=100)) for t in ("orders", "chat")}
    cut = sum(1 for f in finishes if f == "length")
    print(f"sent {len(requests)} requests ({cut} cut at max_tokens); stored: {stored['orders']} orders, {stored['chat']} chat")


if __name__ == "__main__":
    main()
