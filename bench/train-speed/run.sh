#!/usr/bin/env bash
# Training speed: minnow's `distill train` against PyTorch + transformers (and
# PEFT for LoRA) on the same CPU, the same batches, the same thread count,
# side by side in one run, alternating.
#
# minnow trains first with `--trace`, which records every step's learning rate
# and rows; torch_train.py replays exactly those steps (same initial weights:
# the GGUF dequantized to f32 by transformers; same loss, AdamW, clipping).
# tokens/s counts steps after the first (warm-up) from each trainer's own
# per-step timings; peak RSS is the whole process's.
#
#   bench/train-speed/run.sh                          # SmolLM2-135M, full and LoRA
#   MODEL=qwen2.5-coder-0.5b MODES=lora bench/train-speed/run.sh
#
# Environment: MODEL (a test model name or GGUF; smollm2-135m), MODES ("full
# lora"), STEPS (10), RUNS (2 alternations), THREADS (2), DATA (the reference
# experiment's labels), VENV (where PyTorch is installed from PyPI on first
# use: ~/.cache/minnow/train-speed-venv), OUT (bench/train-speed/out).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
model="${MODEL:-smollm2-135m}"
modes="${MODES:-full lora}"
steps="${STEPS:-10}"
runs="${RUNS:-2}"
threads="${THREADS:-2}"
data="${DATA:-$root/examples/order-extraction/labeled/dataset.jsonl}"
venv="${VENV:-$HOME/.cache/minnow/train-speed-venv}"
out="${OUT:-$here/out}"
mkdir -p "$out"

if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c "import torch, transformers, peft, gguf" 2>/dev/null; then
    echo "train-speed: installing PyTorch, transformers, PEFT into $venv (once)" >&2
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps torch==2.15.0
    "$venv/bin/pip" install -q --disable-pip-version-check filelock sympy networkx jinja2 fsspec \
        typing-extensions numpy transformers==5.25.0 peft==0.21.2 gguf safetensors sentencepiece protobuf
fi

(cd "$root" && cargo build --release --locked -q -p minnow)
minnow="$root/target/release/minnow"
gguf="$("$minnow" pull "$model" | tail -1)"

# Peak RSS of a command, in bytes, on stdout's last line (its own output to stderr).
peak_rss() {
    python3 - "$@" <<'PY'
import resource, subprocess, sys
r = subprocess.run(sys.argv[1:], stdout=sys.stderr)
if r.returncode:
    sys.exit(r.returncode)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024)
PY
}

table="$out/table.md"
echo "| model | mode | trainer | run | tokens/s (steps 2..$steps) | peak RSS | loss at step 1 / $steps |" > "$table"
echo "|---|---|---|---|---|---|---|" >> "$table"
for mode in $modes; do
    case "$mode" in
        full) args=(--lr 2e-4); targs=() ;;
        lora) args=(--lr 1e-3 --lora-rank 16 --lora-alpha 16); targs=(--mode lora --lora-rank 16 --lora-alpha 16) ;;
        *) echo "MODES: full or lora" >&2; exit 2 ;;
    esac
    for run in $(seq 1 "$runs"); do
        trace="$out/$mode-trace-$run.jsonl"
        rm -f "$trace"
        rss=$(peak_rss "$minnow" distill train "$gguf" --data "$data" -o "$out/$mode-student.gguf" \
            "${args[@]}" --batch-tokens 1024 --max-seq 384 --warmup 10 --val-frac 0 --max-steps "$steps" \
            --threads "$threads" --out-type q8_0 --trace "$trace" | tail -1)
        python3 - "$trace" "$rss" "$model" "$mode" "$run" >> "$table" <<'PY'
import json, sys
steps = [json.loads(l) for l in open(sys.argv[1])]
rest = steps[1:]
tps = sum(s["tokens"] for s in rest) / sum(s["seconds"] for s in rest)
print(f"| {sys.argv[3]} | {sys.argv[4]} | minnow | {sys.argv[5]} | {tps:.1f} | {int(sys.argv[2]) / 2**30:.2f} GiB | {steps[0]['loss']:.4f} / {steps[-1]['loss']:.4f} |")
PY
        res="$out/$mode-torch-$run.json"
        rss=$(peak_rss "$venv/bin/python" "$here/torch_train.py" --gguf "$gguf" --trace "$trace" --out "$res" \
            --threads "$threads" "${targs[@]}" | tail -1)
        python3 - "$res" "$rss" "$model" "$mode" "$run" >> "$table" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
steps = r["steps"]
rest = steps[1:]
tps = sum(s["tokens"] for s in rest) / sum(s["seconds"] for s in rest)
trainer = "PyTorch " + r["torch"] + (" + PEFT" if r["mode"] == "lora" else "")
print(f"| {sys.argv[3]} | {sys.argv[4]} | {trainer} | {sys.argv[5]} | {tps:.1f} | {int(sys.argv[2]) / 2**30:.2f} GiB | {steps[0]['loss']:.4f} / {steps[-1]['loss']:.4f} |")
PY
        tail -2 "$table"
    done
done
echo
cat "$table"
