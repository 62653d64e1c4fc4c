#!/usr/bin/env bash
# Quantize one F16 source with minnow and with llama.cpp's llama-quantize, type by
# type, and score every result with the same scorer (`minnow perplexity`, mean NLL
# in nats per token on the golden texts, cut to 512 tokens as the golden files are).
#
#   bench/quantize-vs-llamacpp.sh [-m MODEL] [--types "Q8_0 Q4_K_M …"] [-t THREADS]
#                                 [-o RESULTS.json] [--no-build]
#
# MODEL is a test model's short name or a GGUF path (default smollm2-135m). The
# F16 source is MODEL dequantized by `minnow quantize MODEL f16.gguf F16` (the
# test models ship quantized, so every figure is a second rounding). Each type is
# also quantized with an importance matrix that `minnow imatrix` collects on the
# order task's dev.jsonl, used by both tools (llama-quantize reads minnow's file).
#
# Prints a Markdown table; with -o writes the figures as JSON (the CLI test
# `quantize_is_as_good_as_llama_quantize` reads the committed copy for SmolLM2 in
# crates/minnow/tests/data/llama-quantize-smollm2.json, since CI has no llama.cpp).
# llama.cpp is built as bench/compare-llamacpp.sh builds it.
set -euo pipefail

MODEL=smollm2-135m
TYPES="Q8_0 Q6_K Q5_K_M Q5_0 Q4_K_M Q4_0 Q3_K_M Q2_K"
THREADS=2
OUT_JSON=""
NO_BUILD=0
while [[ $# -gt 0 ]]; do
    case $1 in
        -m|--model) MODEL=$2; shift 2 ;;
        --types) TYPES=$2; shift 2 ;;
        -t|--threads) THREADS=$2; shift 2 ;;
        -o) OUT_JSON=$2; shift 2 ;;
        --no-build) NO_BUILD=1; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) echo "quantize-vs-llamacpp: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
GOLDEN=${MINNOW_GOLDEN:-$REPO/../shared/golden}
TASK=$REPO/../shared/tasks/order-extraction
log() { echo "[quantize] $*" >&2; }

LLAMACPP_TARGETS="llama-quantize" bash "$REPO/bench/compare-llamacpp.sh" --build-only
LLAMA_QUANTIZE=$(ls -1d "${MINNOW_CACHE:-$HOME/.cache/minnow}"/llama.cpp/*/build/bin/llama-quantize | sort -V | tail -1)
MINNOW=$REPO/target/release/minnow
if [[ $NO_BUILD -eq 0 ]]; then
    log "building minnow"
    (cd "$REPO" && cargo build --quiet --release -p minnow)
fi

WORK=${MINNOW_QUANTIZE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/minnow-quantize.XXXXXX")}
mkdir -p "$WORK"
log "work directory $WORK"

# The golden texts of the model family the F16 source comes from.
case $(basename "$MODEL") in
    smollm2*) golden_model=smollm2-135m-instruct-q4_1 ;;
    qwen2.5-coder-0.5b*) golden_model=qwen2.5-coder-0.5b-instruct-q4_k_m ;;
    qwen2.5-coder-1.5b*) golden_model=qwen2.5-coder-1.5b-instruct-q4_k_m ;;
    gemma3*) golden_model=gemma3-270m-q4_k_m ;;
    *) echo "quantize-vs-llamacpp: no golden texts known for $MODEL" >&2; exit 2 ;;
esac
python3 - "$GOLDEN/$golden_model/nll.json" "$WORK" <<'EOF'
import json, sys
for c in json.load(open(sys.argv[1]))["cases"]:
    if c["name"].endswith("_long"):
        continue
    open(f"{sys.argv[2]}/text-{c['name']}.txt", "w").write(c["text"])
EOF
texts=("$WORK"/text-*.txt)
log "texts: ${texts[*]##*/} (golden $golden_model)"

score() { # model.gguf → mean NLL over the texts
    local sum=0 n=0 t v
    for t in "${texts[@]}"; do
        v=$("$MINNOW" perplexity "$1" "$t" --max-tokens 512 --json -t "$THREADS" | python3 -c 'import json,sys; print(json.load(sys.stdin)["mean_nll"])')
        sum=$(python3 -c "print($sum + $v)")
        n=$((n + 1))
    done
    python3 -c "print(round($sum / $n, 4))"
}
size_mb() { python3 -c "import os; print(round(os.path.getsize('$1') / 1e6, 1))"; }

F16=$WORK/f16.gguf
[[ -f $F16 ]] || "$MINNOW" quantize "$MODEL" "$F16" F16 -t "$THREADS" >/dev/null 2>&1
IM=$WORK/imatrix.gguf
[[ -f $IM ]] || "$MINNOW" imatrix "$F16" --data "$TASK/dev.jsonl" -o "$IM" -t "$THREADS" >&2
base=$(score "$F16")
log "F16 source: mean NLL $base"

RESULTS=$WORK/results.jsonl
: >"$RESULTS"
for ty in $TYPES; do
    for im in no yes; do
        args=() largs=()
        if [[ $im == yes ]]; then args=(--imatrix "$IM"); largs=(--imatrix "$IM"); fi
        m=$WORK/minnow-$ty-$im.gguf
        l=$WORK/llama-$ty-$im.gguf
        "$MINNOW" quantize "$F16" "$m" "$ty" "${args[@]}" -t "$THREADS" >/dev/null 2>&1
        "$LLAMA_QUANTIZE" "${largs[@]}" "$F16" "$l" "$ty" "$THREADS" >"$WORK/llama-quantize-$ty-$im.log" 2>&1 \
            || { tail -5 "$WORK/llama-quantize-$ty-$im.log" >&2; exit 1; }
        ms=$(score "$m")
        ls_=$(score "$l")
        log "$ty imatrix=$im: minnow $ms ($(size_mb "$m") MB), llama-quantize $ls_ ($(size_mb "$l") MB)"
        echo "{\"type\": \"$ty\", \"imatrix\": $([[ $im == yes ]] && echo true || echo false), \"minnow_nll\": $ms, \"llama_nll\": $ls_, \"minnow_mb\": $(size_mb "$m"), \"llama_mb\": $(size_mb "$l")}" >>"$RESULTS"
        rm -f "$m" "$l"
    done
done

python3 - "$RESULTS" "$base" "$MODEL" "$golden_model" "$OUT_JSON" "$(size_mb "$F16")" <<'EOF'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
base, model, golden, out, f16_mb = float(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6])
print(f"F16 source ({model}, {f16_mb} MB): mean NLL {base:.4f} on the {golden} golden texts (512 tokens each)\n")
print("| type | imatrix | minnow NLL | llama-quantize NLL | minnow − llama | minnow MB | llama MB |")
print("|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    print(f"| {r['type']} | {'yes' if r['imatrix'] else 'no'} | {r['minnow_nll']:.4f} | {r['llama_nll']:.4f} | "
          f"{r['minnow_nll'] - r['llama_nll']:+.4f} | {r['minnow_mb']} | {r['llama_mb']} |")
if out:
    json.dump({"model": model, "golden_texts": golden, "f16_nll": base, "f16_mb": f16_mb,
               "made_by": "bench/quantize-vs-llamacpp.sh", "rows": rows}, open(out, "w"), indent=1)
EOF
