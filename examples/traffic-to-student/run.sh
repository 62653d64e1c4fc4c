#!/usr/bin/env bash
# From traffic to student, end to end (see README.md for each step):
#   1. the teacher is served with --store; production traffic arrives with
#      store: true and metadata {"task": "orders"} (send_traffic.py, the
#      official openai client), plus unrelated chat that is not for this task;
#   2. `minnow distill run` trains a LoRA student on
#      store:…?metadata.task=orders and evaluates teacher and student on dev.jsonl;
#   3. the student is served as an adapter (`--lora orders=…`) and answers
#      a task request by its name.
#
# Environment: TEACHER (qwen2.5-coder-1.5b), STUDENT (smollm2-135m), N_ORDERS (64),
# N_CHAT (8), EPOCHS (2), STEPS (train steps; overrides EPOCHS), EVAL_LIMIT (all),
# THREADS, WORK_DIR (examples/traffic-to-student/work), MINNOW, TASK_DIR.
# Rerun after an interruption: the store, the training and the report resume.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
task="${TASK_DIR:-$repo/../shared/tasks/order-extraction}"
minnow="${MINNOW:-$repo/target/release/minnow}"
work="${WORK_DIR:-$here/work}"
threads="${THREADS:-$(nproc)}"
teacher="${TEACHER:-qwen2.5-coder-1.5b}"
student="${STUDENT:-smollm2-135m}"
n_orders="${N_ORDERS:-64}"
n_chat="${N_CHAT:-8}"
mkdir -p "$work"
[ -x "$minnow" ] || (cd "$repo" && cargo build --release -p minnow)

# Starts `minnow serve` with the given arguments in the background; sets
# $server_pid and $server_url once it listens.
serve() {
    local log="$work/serve.log"
    "$minnow" serve "$@" --port 0 -t "$threads" 2> "$log" &
    server_pid=$!
    for _ in $(seq 600); do
        server_url=$(sed -n 's|.* on \(http://[^/]*\)/ .*|\1|p' "$log" | head -n1)
        [ -n "$server_url" ] && return 0
        kill -0 "$server_pid" 2>/dev/null || { cat "$log" >&2; exit 1; }
        sleep 0.2
    done
    echo "run.sh: minnow serve did not start" >&2; cat "$log" >&2; exit 1
}
stop() { kill -TERM "$server_pid" 2>/dev/null && wait "$server_pid" 2>/dev/null || true; }
trap stop EXIT

# 1. The teacher serves traffic and keeps what it answered for the task.
if [ ! -f "$work/traffic.done" ]; then
    serve "$teacher" --store "$work/store" --parallel 4 --ctx 2048
    python3 "$here/send_traffic.py" --base-url "$server_url/v1" --inputs "$task/inputs.jsonl" \
        --orders "$n_orders" --chat "$n_chat" | tee "$work/traffic.txt"
    stop
    touch "$work/traffic.done"
fi

# 2. Train the student on the stored task traffic, then evaluate both.
if [ -n "${STEPS:-}" ]; then length="max_steps = $STEPS"; else length="epochs = ${EPOCHS:-2}"; fi
limit=""
[ -n "${EVAL_LIMIT:-}" ] && limit="limit = $EVAL_LIMIT"
cat > "$work/pipeline.toml" <<TOML
work_dir = "."

[train]
data = "store:store?metadata.task=orders"
student = "$student"
lora_rank = 16
lr = 1e-3
$length
warmup = 2
batch_tokens = 1024
max_seq = 384
adapter_out = "$work/orders-adapter.gguf"
output = "student.gguf"
threads = $threads

[eval]
data = "$task/dev.jsonl"
models = ["teacher=$teacher", "student, zero-shot, untrained=$student", "distilled student=student"]
scorer = "json-fields"
price_per_hour = ${PRICE_PER_HOUR:-0.10}
max_tokens = 96
parallel = 8
threads = $threads
$limit
output = "report"
TOML
"$minnow" distill run "$work/pipeline.toml"

# 3. The student served as an adapter of its base, answering by its name.
serve "$student" --lora "orders=$work/orders-adapter.gguf" --parallel 2 --ctx 1024
python3 - "$server_url/v1" "$task/dev.jsonl" <<'PY'
import json, sys, openai
client = openai.OpenAI(base_url=sys.argv[1], api_key="none", max_retries=0)
print("served:", [m.id for m in client.models.list().data])
case = json.loads(open(sys.argv[2]).readline())
r = client.chat.completions.create(model="orders", messages=[{"role": "user", "content": case["prompt"]}],
                                   temperature=0, max_tokens=96)
print("orders adapter:", r.choices[0].message.content)
PY
stop
cat "$work/report/report.md"
