"""Long streams through the official `openai` client while `minnow serve`
shuts down: each must end with an exception, never as a normal answer.

Run by crates/minnow/tests/serve_hardening.rs with MINNOW_BASE_URL,
MINNOW_API_KEY, MINNOW_MODEL_ID and STREAMS set. Prints `READY` once every
stream has received text (the test then sends SIGTERM), then one JSON line
per stream (`{"index", "outcome", "chunks", "error"}`), and exits 0 only if
every stream raised `openai.APIError` saying the server is shutting down.
"""

import json
import os
import sys
import threading

import openai

BASE_URL = os.environ["MINNOW_BASE_URL"]
API_KEY = os.environ.get("MINNOW_API_KEY", "none")
MODEL = os.environ["MINNOW_MODEL_ID"]
STREAMS = int(os.environ.get("STREAMS", "4"))

started = threading.Barrier(STREAMS + 1)
results = [None] * STREAMS


def run(i):
    client = openai.OpenAI(base_url=BASE_URL, api_key=API_KEY, max_retries=0, timeout=120)
    chunks = 0
    signalled = False
    try:
        stream = client.completions.create(
            model=MODEL,
            prompt=f"Story {i}: Once upon a time",
            max_tokens=1000,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        for chunk in stream:
            chunks += 1
            if not signalled and chunk.choices and chunk.choices[0].text:
                signalled = True
                started.wait(timeout=120)
        results[i] = {"index": i, "outcome": "completed", "chunks": chunks, "error": None}
    except openai.APIError as e:
        results[i] = {"index": i, "outcome": "raised", "chunks": chunks, "error": str(e)}
    except Exception as e:  # anything else (a bare connection error) is a failure too
        results[i] = {"index": i, "outcome": type(e).__name__, "chunks": chunks, "error": str(e)}
    finally:
        if not signalled:
            try:
                started.wait(timeout=1)
            except threading.BrokenBarrierError:
                pass


threads = [threading.Thread(target=run, args=(i,)) for i in range(STREAMS)]
for t in threads:
    t.start()
started.wait(timeout=180)
print("READY", flush=True)
for t in threads:
    t.join(timeout=120)

ok = True
for r in results:
    print(json.dumps(r), flush=True)
    if r is None or r["outcome"] != "raised" or "shutting down" not in (r["error"] or "") or r["chunks"] < 2:
        ok = False
print("all streams raised" if ok else "FAILED: a stream did not raise as it should", flush=True)
sys.exit(0 if ok else 1)
