#!/usr/bin/env bash
# Speculative decoding, minnow and llama.cpp side by side, in one run:
#
#   bench/compare-speculative.sh [-t THREADS] [-r ROUNDS] [-n GEN_TOKENS] [-k CASES] [-w WARM]
#
# Two workloads, greedy, Qwen2.5-Coder-1.5B-Instruct Q4_K_M as the target:
# - code: raw completion of Python classes (GEN_TOKENS tokens), the 0.5B
#   Qwen2.5-Coder as draft model;
# - extract: the first CASES messages of the order-extraction task
#   (../shared/tasks/order-extraction/dev.jsonl) in Qwen's chat template,
#   prompt-lookup (n-gram) drafting, the answer ending at end-of-turn.
#   Before the rounds, each engine answers WARM other messages of the task
#   (default 4; the next ones in dev.jsonl) with lookup decoding, keeping
#   what it learns from its answers — minnow in a `--lookup-memory` file
#   (earlier answers drafting the shared JSON skeleton), llama-lookup in its
#   dynamic n-gram cache (`-lcd`) — as a labeling run over many inputs
#   would. Measured runs only read them (a fresh copy each run), so no run
#   sees an answer to its own prompt. -w 0: prompt lookup alone.
#
# Per prompt and round, alternating which engine goes first:
# - `minnow bench --draft/--lookup -r 1`: plain then speculative generation of
#   the same prompt, same process (tok/s of both, acceptance, passes);
# - llama.cpp: `llama-speculative` with the same draft model (code) or
#   `llama-lookup`, its prompt-lookup decoder (extract), on the same prompt
#   text, both with llama.cpp's default draft lengths; and
#   `llama-bench -p 0 -n N` for the target alone. All with `--poll 0`: on a
#   shared machine llama.cpp's default busy-polling threads stall whenever a
#   partner thread is descheduled (measured here under load: 0.5 tok/s for
#   the 1.5B instead of ~14); minnow's pool yields while waiting likewise.
# Reports medians over rounds and prompts, and the speed-up ratios. The
# machine may be shared: look at the spread in $OUT/results.jsonl too.
#
# Needs target/release/minnow (cargo build --release -p minnow) and
# llama.cpp's llama-speculative, llama-lookup and llama-bench:
#   LLAMACPP_TARGETS="llama-bench llama-speculative llama-lookup" bench/compare-llamacpp.sh --build-only
# builds them into ~/.cache/minnow/llama.cpp.
#
# Environment: MINNOW_BIN (default target/release/minnow), MINNOW_LLAMACPP_BIN (default ~/.cache/minnow/llama.cpp/0.3.36/build/bin),
# MINNOW_COMPARE_OUT (raw results; default a new folder in /tmp).
set -euo pipefail

THREADS=2
ROUNDS=3
TG=128
CASES=3
WARM=4
while [[ $# -gt 0 ]]; do
    case $1 in
        -t) THREADS=$2; shift 2 ;;
        -r) ROUNDS=$2; shift 2 ;;
        -n) TG=$2; shift 2 ;;
        -k) CASES=$2; shift 2 ;;
        -w) WARM=$2; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "compare-speculative: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
[[ $WARM =~ ^[0-9]+$ ]] || { echo "compare-speculative: WARM must be a number" >&2; exit 2; }
for v in THREADS ROUNDS TG CASES; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "compare-speculative: $v must be a positive integer" >&2; exit 2; }
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
MINNOW=${MINNOW_BIN:-$REPO/target/release/minnow}
LLAMA=${MINNOW_LLAMACPP_BIN:-$HOME/.cache/minnow/llama.cpp/0.3.36/build/bin}
TASK=$REPO/../shared/tasks/order-extraction/dev.jsonl
for f in "$MINNOW" "$LLAMA/llama-speculative" "$LLAMA/llama-lookup" "$LLAMA/llama-bench"; do
    [[ -x $f ]] || { echo "compare-speculative: $f is missing (see --help)" >&2; exit 1; }
done
[[ -f $TASK ]] || { echo "compare-speculative: $TASK is missing" >&2; exit 1; }
TARGET=$("$MINNOW" pull qwen2.5-coder-1.5b | tail -1)
DRAFT=$("$MINNOW" pull qwen2.5-coder-0.5b | tail -1)
OUT=${MINNOW_COMPARE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/minnow-spec.XXXXXX")}
mkdir -p "$OUT/prompts" "$OUT/user" "$OUT/warm"
RESULTS=$OUT/results.jsonl
: >"$RESULTS"
log() { echo "[compare-spec] $*" >&2; }

# The prompts, as files of exact text (special tokens written out, as both
# engines parse them): code prompts raw, extraction prompts in Qwen2.5's chat
# template with its default system message (what the model's template adds).
python3 - "$OUT/prompts" "$TASK" "$CASES" "$WARM" <<'EOF'
import json, os, sys
out, task, cases, warm = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = os.path.dirname(out)
code = [
    "# A Python class for a bank account with deposits, withdrawals, interest and a transaction history.\n\nclass BankAccount:\n",
    "# A Python class for an LRU cache with get, put, a capacity limit and hit/miss statistics.\n\nclass LRUCache:\n",
]
for i, p in enumerate(code):
    open(f"{out}/code-{i}.txt", "w").write(p)
system = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
lines = open(task).readlines()
for i, line in enumerate(lines[:cases + warm]):
    user = json.loads(line)["prompt"]
    text = f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    if i < cases:
        open(f"{out}/extract-{i}.txt", "w").write(text)
        open(f"{base}/user/extract-{i}.txt", "w").write(user)
    else:
        open(f"{base}/warm/chat-{i}.txt", "w").write(text)
        open(f"{base}/warm/user-{i}.txt", "w").write(user)
EOF

record() { # workload prompt engine round json-on-stdin
    python3 -c 'import json, sys
print(json.dumps({"workload": sys.argv[1], "prompt": sys.argv[2], "engine": sys.argv[3], "round": int(sys.argv[4]),
                  "out": json.load(sys.stdin)}))' "$@" >>"$RESULTS"
}

# llama-speculative's end-of-run report → JSON.
parse_llama_spec() {
    python3 -c 'import json, re, sys
t = sys.stdin.read()
def num(pat, cast=float):
    m = re.search(pat, t)
    return cast(m.group(1)) if m else None
print(json.dumps({"decoded": num(r"decoded\s+(\d+)\s+tokens", int), "tps": num(r"decoded\s+\d+\s+tokens in\s+[\d.]+\s+seconds, speed:\s+([\d.]+)"),
                  "drafted": num(r"n_drafted\s*=\s*(\d+)", int), "accepted": num(r"n_accept\s*=\s*(\d+)", int),
                  "accept_pct": num(r"accept\s*=\s*([\d.]+)%")}))'
}

# What each engine learned from the warm-up answers (read-only below).
MEMORY=$OUT/minnow-lookup-memory.jsonl
LCD=$OUT/llama-lookup-dynamic.bin

run_minnow() { # workload prompt-file
    local args=(--draft "$DRAFT" --draft-prompt "$(cat "$2")")
    # The extraction prompt as the chat template makes it (the same tokens
    # as the file's text), as the warm-up's `run --chat` made the memory's.
    [[ $1 == extract ]] && args=(--lookup --lookup-memory "$MEMORY" --draft-chat --draft-prompt "$(cat "$OUT/user/$(basename "$2")")")
    "$MINNOW" bench "$TARGET" --threads "$THREADS" -n "$TG" -r 1 "${args[@]}" --json
}

run_llama() { # workload prompt-file
    local cmd=("$LLAMA/llama-speculative" -md "$DRAFT" --poll-draft 0)
    if [[ $1 == extract ]]; then
        cmd=("$LLAMA/llama-lookup")
        if [[ -f $LCD ]]; then cp "$LCD" "$OUT/lcd-run.bin"; cmd+=(-lcd "$OUT/lcd-run.bin"); fi
    fi
    "${cmd[@]}" -m "$TARGET" -f "$2" -n "$TG" -t "$THREADS" -c 2048 --poll 0 \
        --temp 0 --top-k 1 --seed 1 2>&1 | tee -a "$OUT/llama-$1.log" | parse_llama_spec
}

# Warm-up: both engines answer the WARM other messages with lookup decoding
# and keep what they learn.
rm -f "$MEMORY" "$LCD"
for f in "$OUT"/warm/chat-*.txt; do
    [[ -f $f ]] || continue
    i=${f##*-}; i=${i%.txt}
    log "warm-up $i: minnow, llama-lookup"
    "$MINNOW" run "$TARGET" --threads "$THREADS" -n "$TG" --temp 0 --lookup --lookup-memory "$MEMORY" --chat \
        -p "$(cat "$OUT/warm/user-$i.txt")" >>"$OUT/warm.log" 2>&1
    "$LLAMA/llama-lookup" -m "$TARGET" -f "$f" -n "$TG" -t "$THREADS" -c 2048 --poll 0 --temp 0 --top-k 1 --seed 1 \
        -lcd "$LCD" >>"$OUT/warm.log" 2>&1
done

for ((round = 1; round <= ROUNDS; round++)); do
    # llama.cpp's target alone: generation speed does not depend on the
    # prompt's text, so once per round.
    log "round $round/$ROUNDS: llama-bench (load $(cut -d' ' -f1 /proc/loadavg))"
    "$LLAMA/llama-bench" -m "$TARGET" -t "$THREADS" -p 0 -n "$TG" -r 1 --poll 0 -o json 2>>"$OUT/llama-bench.log" \
        | record all bench llama-plain "$round"
    for f in "$OUT"/prompts/*.txt; do
        name=$(basename "$f" .txt)
        workload=${name%-*}
        if ((round % 2)); then order="llama minnow"; else order="minnow llama"; fi
        for engine in $order; do
            log "round $round/$ROUNDS $name: $engine (load $(cut -d' ' -f1 /proc/loadavg))"
            if [[ $engine == minnow ]]; then
                run_minnow "$workload" "$f" | record "$workload" "$name" minnow "$round"
            else
                run_llama "$workload" "$f" | record "$workload" "$name" llama "$round"
            fi
        done
    done
done

python3 - "$RESULTS" "$THREADS" "$TG" "$WARM" <<'EOF'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
threads, tg = sys.argv[2], sys.argv[3]
med = statistics.median
warm = sys.argv[4]
print(f"\nGreedy, {threads} threads, up to {tg} tokens, Qwen2.5-Coder-1.5B-Instruct Q4_K_M target; medians over prompts x rounds;"
      f" extraction after {warm} warm-up answers.\n")
print("| workload | drafts | engine | target alone tok/s | speculative tok/s | speed-up | accepted | tokens/target pass |")
print("|---|---|---|---|---|---|---|---|")
for wl, drafts in [("code", "Qwen2.5-Coder-0.5B"), ("extract", "prompt lookup + earlier answers")]:
    m = [r["out"] for r in rows if r["workload"] == wl and r["engine"] == "minnow"]
    l = [r["out"] for r in rows if r["workload"] == wl and r["engine"] == "llama"]
    plain = med([r["out"][0]["avg_ts"] for r in rows if r["engine"] == "llama-plain"])
    if m:
        # Per-run ratios (plain and speculative measured back to back), then their median.
        ratio = med([x["speculative_tps"] / x["plain_tps"] for x in m])
        acc = med([x["speculative"]["acceptance_rate"] for x in m])
        tpf = med([x["speculative"]["tokens_per_target_forward"] for x in m])
        print(f"| {wl} | {drafts} | minnow | {med([x['plain_tps'] for x in m]):.2f} | {med([x['speculative_tps'] for x in m]):.2f} "
              f"| {ratio:.2f}x | {100*acc:.0f}% | {tpf:.2f} |")
    ls = [x for x in l if x["tps"]]
    if ls:
        spec = med([x["tps"] for x in ls])
        acc = med([x["accept_pct"] or 0 for x in ls])
        print(f"| {wl} | {drafts} | llama.cpp | {plain:.2f} | {spec:.2f} | {spec/plain:.2f}x | {acc:.0f}% | |")
    if m and ls:
        print(f"| {wl} | | minnow / llama.cpp | {med([x['plain_tps'] for x in m])/plain:.2f}x | "
              f"{med([x['speculative_tps'] for x in m])/spec:.2f}x | | | |")
# Per-pass costs measured by minnow in the code runs (for what a smaller draft would buy).
m = [r["out"]["speculative"] for r in rows if r["workload"] == "code" and r["engine"] == "minnow"]
if m:
    plain = med([x["plain_step_secs"] for x in m if x.get("plain_step_secs")])
    draft = med([x["draft_secs"] / x["draft_forwards"] for x in m if x["draft_forwards"]])
    verify = med([(x["target_secs"] - x["plain_steps"] * plain) / max(1, x["target_forwards"] - x["plain_steps"]) for x in m])
    print(f"\nminnow per-pass costs (code): target 1-token step {1e3*plain:.1f} ms, verifying pass {1e3*verify:.1f} ms, "
          f"0.5B draft step {1e3*draft:.1f} ms ({draft/plain:.2f} of a target step)")
EOF
echo "raw results: $RESULTS" >&2
