#!/usr/bin/env bash
# What the KL term adds over sequence-level distillation, where teacher and
# student share a vocabulary: Qwen2.5-Coder-0.5B-Instruct as the student of
# Qwen2.5-Coder-1.5B-Instruct.
#   1. The teacher labels the first N_KL inputs (3 worked examples, greedy)
#      and keeps its top-8 log-probabilities per answer token.
#   2. The 0.5B student is fine-tuned twice on the same data, same settings:
#      cross-entropy on the answer tokens alone (β = 0), and with the KL term
#      on the teacher's top-8 distribution (β = KL_WEIGHT, τ = 1).
#   3. Both, and the untrained 0.5B, are evaluated zero-shot on dev.jsonl
#      (minus the 3 worked examples; EVAL_LIMIT to cut it).
# Full fine-tuning of the 0.5B holds ~16 GB (f32 weights, gradients, AdamW
# state); LORA_RANK=16 trains adapters instead, BATCH_TOKENS sets the
# micro-batch (default 1024).
# Outputs go to work-kl/ (report in work-kl/report/, copied to report-kl/).
# Every stage resumes: rerun the script after an interruption. The labels of
# a run are kept in labeled/kl-dataset-top8.jsonl: copy them to
# work-kl/dataset.jsonl to skip labeling.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
task="${TASK_DIR:-$repo/../shared/tasks/order-extraction}"
minnow="${MINNOW:-$repo/target/release/minnow}"
work="${WORK_DIR:-$here/work-kl}"
report="${REPORT_DIR:-$here/report-kl}"
threads="${THREADS:-$(nproc)}"
n="${N_KL:-48}"
beta="${KL_WEIGHT:-0.5}"
teacher=qwen2.5-coder-1.5b
student=qwen2.5-coder-0.5b
mkdir -p "$work" "$report"
[ -x "$minnow" ] || (cd "$repo" && cargo build --release -p minnow)

timings="$work/timings.tsv"
. "$here/stage.sh"

[ -f "$work/dataset.jsonl" ] && [ "$(wc -l < "$work/dataset.jsonl")" -ge "$n" ] || stage label \
    "$minnow" distill label "$task/inputs.jsonl" -o "$work/dataset.jsonl" --teacher "$teacher" \
    --examples "$task/dev.jsonl" --n-examples 3 --max-tokens 96 --parallel 8 --ctx 1024 -t "$threads" \
    --logprobs 8 --limit "$n"

train() { # train NAME KL_WEIGHT
    [ -f "$work/$1.gguf" ] || stage "train $1" "$minnow" distill train "$student" --data "$work/dataset.jsonl" \
        -o "$work/$1.gguf" --epochs "${EPOCHS:-2}" --lr "${LR:-1e-4}" --warmup 2 --max-seq 384 --batch-tokens "${BATCH_TOKENS:-1024}" \
        --kl-weight "$2" --kl-temperature 1 --checkpoint-dir "$work/checkpoints-$1" --threads "$threads" --out-type q8_0 \
        ${LORA_RANK:+--lora-rank "$LORA_RANK"}
}
train ce 0
train ce-kl "$beta"

limit_args=()
[ -n "${EVAL_LIMIT:-}" ] && limit_args=(--limit "$EVAL_LIMIT")
stage eval "$minnow" distill eval "$task/dev.jsonl" --few-shot "$task/dev.jsonl" --n-shot 3 \
    --model "student 0.5B, zero-shot, untrained=$student" \
    --model "0.5B distilled, cross-entropy only=$work/ce.gguf" \
    --model "0.5B distilled, cross-entropy + KL (β $beta)=$work/ce-kl.gguf" \
    --scorer json-fields --price-per-hour "${PRICE_PER_HOUR:-0.10}" --max-tokens 96 --parallel 8 -t "$threads" \
    "${limit_args[@]}" -o "$work/report"
cp "$work/report/report.md" "$work/report/report.json" "$work/report/chart.svg" "$report/"
cp "$timings" "$report/timings.tsv"
echo "report: $report/report.md"
