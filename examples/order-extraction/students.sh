#!/usr/bin/env bash
# The reference experiment's student shipped three ways, side by side on dev.jsonl:
# trained on the committed teacher labels (labeled/dataset.jsonl, 320 inputs), then
# exported Q8_0, Q4_K_M, and Q4_K_M with an importance matrix of the training data —
# what `distill train --out-type q4_k_m` does in one step (`minnow imatrix` on the
# training set, then `minnow quantize --imatrix`), done here in steps so the three
# files come from one training run.
#
#   examples/order-extraction/students.sh            # LoRA rank 16 (default)
#   MODE=full examples/order-extraction/students.sh  # full fine-tuning
#
# Environment: MODE (lora|full), EPOCHS (2), LR (1e-3 for LoRA, 2e-4 full), THREADS,
# WORK_DIR (default examples/order-extraction/work-students-$MODE), EVAL_LIMIT.
# Every stage resumes: rerun after an interruption. The table is written to
# $WORK_DIR/report/report.md (field accuracy, exact, decode tok/s, $ per case) and the
# file sizes to $WORK_DIR/sizes.md.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
task="${TASK_DIR:-$repo/../shared/tasks/order-extraction}"
minnow="${MINNOW:-$repo/target/release/minnow}"
mode="${MODE:-lora}"
work="${WORK_DIR:-$here/work-students-$mode}"
threads="${THREADS:-$(nproc)}"
price="${PRICE_PER_HOUR:-0.10}"
student="${STUDENT:-smollm2-135m}"
data="$here/labeled/dataset.jsonl"
mkdir -p "$work"
[ -x "$minnow" ] || (cd "$repo" && cargo build --release -p minnow)
timings="$work/timings.tsv"
. "$here/stage.sh"

case $mode in
    lora) train_args=(--lora-rank 16 --lr "${LR:-1e-3}") ;;
    full) train_args=(--lr "${LR:-2e-4}") ;;
    *) echo "students.sh: MODE is lora or full" >&2; exit 2 ;;
esac

# 1. Train once; the merged student is kept in F16 (the trained tensors; the rest
#    as the base has them), the source of every export below.
[ -f "$work/student-f16.gguf" ] || stage train "$minnow" distill train "$student" --data "$data" \
    -o "$work/student-f16.gguf" "${train_args[@]}" --epochs "${EPOCHS:-2}" --warmup 10 --max-seq 384 \
    --batch-tokens 1024 --checkpoint-dir "$work/checkpoints" --threads "$threads" --out-type f16

# 2. The exports.
[ -f "$work/imatrix.gguf" ] || stage imatrix "$minnow" imatrix "$work/student-f16.gguf" --data "$data" \
    -o "$work/imatrix.gguf" -t "$threads"
[ -f "$work/student-q8_0.gguf" ] || stage q8_0 "$minnow" quantize "$work/student-f16.gguf" "$work/student-q8_0.gguf" Q8_0 -t "$threads"
[ -f "$work/student-q4_k_m.gguf" ] || stage q4_k_m "$minnow" quantize "$work/student-f16.gguf" "$work/student-q4_k_m.gguf" Q4_K_M -t "$threads"
[ -f "$work/student-q4_k_m-im.gguf" ] || stage q4_k_m-im "$minnow" quantize "$work/student-f16.gguf" \
    "$work/student-q4_k_m-im.gguf" Q4_K_M --imatrix "$work/imatrix.gguf" -t "$threads"

# 3. Evaluate the three on the dev cases, zero-shot, as run.sh evaluates the student.
limit_args=()
[ -n "${EVAL_LIMIT:-}" ] && limit_args=(--limit "$EVAL_LIMIT")
stage eval "$minnow" distill eval "$task/dev.jsonl" --few-shot "$task/dev.jsonl" --n-shot 3 \
    --model "$mode student, Q8_0=$work/student-q8_0.gguf" \
    --model "$mode student, Q4_K_M=$work/student-q4_k_m.gguf" \
    --model "$mode student, Q4_K_M + task imatrix=$work/student-q4_k_m-im.gguf" \
    --scorer json-fields --price-per-hour "$price" --max-tokens 96 --parallel 8 -t "$threads" \
    "${limit_args[@]}" -o "$work/report"
{
    echo "| file | MB |"
    echo "|---|---:|"
    for f in "$work"/student-*.gguf; do
        printf '| %s | %.1f |\n' "$(basename "$f")" "$(echo "$(stat -c %s "$f") / 1000000" | bc -l)"
    done
} > "$work/sizes.md"
cat "$work/report/report.md" "$work/sizes.md"
