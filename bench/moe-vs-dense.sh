#!/usr/bin/env bash
# A dense model against its upcycled MoE, minnow only: ROUNDS alternating
# `minnow bench` runs of each, then per-round and median ratios (MoE ÷ dense).
#
#   bench/moe-vs-dense.sh DENSE.gguf MOE.gguf [ROUNDS=5] [PP=64] [TG=32] [THREADS=2]
#
# Alternating runs on the same machine make the ratio robust to load that a
# single pair of runs would not survive.
set -euo pipefail
DENSE=$1 MOE=$2 ROUNDS=${3:-5} PP=${4:-64} TG=${5:-32} THREADS=${6:-2}
MINNOW=${MINNOW:-$(dirname "$0")/../target/release/minnow}
OUT=$(mktemp)
for ((r = 1; r <= ROUNDS; r++)); do
    for f in "$DENSE" "$MOE"; do
        printf '%s\t%s\n' "$f" "$("$MINNOW" bench "$f" -t "$THREADS" -p "$PP" -n "$TG" -r 1 --json | tr -d '\n')" >>"$OUT"
    done
done
python3 - "$OUT" "$DENSE" "$MOE" <<'PY'
import json, statistics, sys
runs = {}
for line in open(sys.argv[1]):
    f, j = line.rstrip("\n").split("\t", 1)
    runs.setdefault(f, []).append(json.loads(j))
d, m = runs[sys.argv[2]], runs[sys.argv[3]]
for key in ("pp_tps", "tg_tps"):
    per = [b[key] / a[key] for a, b in zip(d, m)]
    med = statistics.median(x[key] for x in m) / statistics.median(x[key] for x in d)
    print(f"{key[:2]}: dense {statistics.median(x[key] for x in d):.1f}, moe {statistics.median(x[key] for x in m):.1f} tok/s;"
          f" ratio of medians {med:.2f}x, per round {' '.join(f'{x:.2f}' for x in per)}")
PY
rm -f "$OUT"
