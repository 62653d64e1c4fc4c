#!/usr/bin/env bash
# The reference experiment, end to end on this machine's CPU:
#   1. label: Qwen2.5-Coder-1.5B-Instruct, shown 3 worked examples from
#      dev.jsonl, labels unlabeled inputs. The labeling rate is measured on
#      the first 16 inputs, and the number labeled is sized to fit
#      LABEL_BUDGET_S seconds (or set N_LABEL).
#   2. train: SmolLM2-135M-Instruct is fine-tuned on the zero-shot
#      conversations (cross-entropy on the teacher's answer tokens).
#   3. eval: the four reference rows and the distilled student on dev.jsonl
#      minus the 3 examples (the first EVAL_LIMIT of them, default all 97).
# Each stage is timed; the report (report.md, report.json, chart.svg,
# timings.md) is written to examples/order-extraction/report/.
# Every stage resumes: rerun the script after an interruption.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
task="${TASK_DIR:-$repo/../shared/tasks/order-extraction}"
minnow="${MINNOW:-$repo/target/release/minnow}"
work="${WORK_DIR:-$here/work}"
report="${REPORT_DIR:-$here/report}"
threads="${THREADS:-$(nproc)}"
price="${PRICE_PER_HOUR:-0.10}"
budget="${LABEL_BUDGET_S:-1500}"
teacher="${TEACHER:-qwen2.5-coder-1.5b}"
student="${STUDENT:-smollm2-135m}"
mkdir -p "$work" "$report"
[ -x "$minnow" ] || (cd "$repo" && cargo build --release -p minnow)

timings="$work/timings.tsv"
. "$here/stage.sh"

label() { # label LIMIT
    "$minnow" distill label "$task/inputs.jsonl" -o "$work/dataset.jsonl" \
        --teacher "$teacher" --examples "$task/dev.jsonl" --n-examples 3 \
        --max-tokens 96 --parallel 8 --ctx 1024 -t "$threads" \
        --price-per-hour "$price" --limit "$1"
}

# 1. Labeling rate on the first 16 inputs, then as many as the budget allows
#    (the number is kept in work/n_label, so a rerun labels the same set).
if [ -f "$work/n_label" ]; then
    N_LABEL=$(cat "$work/n_label")
else
    stage label-probe label 16
    probe_s=$(awk -F'\t' '$1=="label-probe"{print $2}' "$timings")
    if [ -z "${N_LABEL:-}" ]; then
        N_LABEL=$(echo "n = 16 * $budget / $probe_s; if (n > 2000) n = 2000; if (n < 16) n = 16; n / 1" | bc)
    fi
    echo "$N_LABEL" > "$work/n_label"
fi
probe_s=$(awk -F'\t' '$1=="label-probe"{print $2}' "$timings")
echo "labeling rate: 16 inputs in ${probe_s} s (model load included); labeling $N_LABEL inputs"
[ "$(wc -l < "$work/dataset.jsonl")" -ge "$N_LABEL" ] || stage label label "$N_LABEL"

# 2. Train the student on the zero-shot conversations (skipped when done;
#    an interrupted run resumes from its checkpoints).
[ -f "$work/student.gguf" ] || stage train "$minnow" distill train "$student" --data "$work/dataset.jsonl" -o "$work/student.gguf" \
    --epochs "${EPOCHS:-2}" --lr "${LR:-2e-4}" --warmup 10 --max-seq 384 --batch-tokens "${BATCH_TOKENS:-1024}" \
    --checkpoint-dir "$work/checkpoints" --threads "$threads" --out-type q8_0

# 3. Evaluate: teacher and student, few-shot and zero-shot, and the distilled student.
limit_args=()
[ -n "${EVAL_LIMIT:-}" ] && limit_args=(--limit "$EVAL_LIMIT")
stage eval "$minnow" distill eval "$task/dev.jsonl" --few-shot "$task/dev.jsonl" --n-shot 3 \
    --model-few-shot "teacher 1.5B, 3 examples=$teacher" \
    --model "teacher 1.5B, zero-shot=$teacher" \
    --model-few-shot "student 135M, 3 examples=$student" \
    --model "student 135M, zero-shot, untrained=$student" \
    --model "distilled student 135M, zero-shot=$work/student.gguf" \
    --agree-with "teacher 1.5B, 3 examples" --scorer json-fields \
    --price-per-hour "$price" --max-tokens 96 --parallel 8 -t "$threads" "${limit_args[@]}" -o "$work/report"

cp "$work/report/report.md" "$work/report/report.json" "$work/report/chart.svg" "$report/"
{
    echo "# Stage timings ($(nproc) CPUs: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs))"
    echo
    echo "Inputs labeled: $N_LABEL (labeling rate measured on 16 inputs first: ${probe_s} s including the model load)."
    echo "Dev cases evaluated: ${EVAL_LIMIT:-97} (of the 97 left after the 3 worked examples)."
    echo
    echo "| stage | seconds |"
    echo "|---|---|"
    awk -F'\t' '{printf "| %s | %s |\n", $1, $2}' "$timings"
} > "$report/timings.md"
cat "$report/timings.md"
echo "report: $report/report.md"
