#!/usr/bin/env bash
# minnow and llama.cpp side by side: prompt processing and generation speed on
# the test models, same GGUF files, same threads and lengths, in one run.
#
#   bench/compare-llamacpp.sh [-m MODEL|FILE.gguf,...] [-t THREADS] [-r ROUNDS]
#                             [-p PROMPT_TOKENS] [-n GEN_TOKENS] [--build-only]
#                             [--no-build] [--depths D1,D2|none] [--depth-rounds N]
#                             [--depth-caches f16,q8_0]
#
# 1. Builds llama.cpp's llama-bench (and the other $LLAMACPP_TARGETS) from the
#    llama-cpp-python source distribution on PyPI, whose vendor/llama.cpp is a
#    llama.cpp release. The build is cached outside the repository in
#    $MINNOW_LLAMACPP_DIR (default ~/.cache/minnow/llama.cpp), one folder per
#    sdist version; nothing of llama.cpp ever enters this repository.
# 2. Builds minnow and the bandwidth tool (crates/kernels/examples/membw.rs;
#    --no-build uses target/release's as they are), and measures the
#    machine's read bandwidth with THREADS threads at the start, before every
#    engine run, after each model's last run, and at the end (0.7 s each):
#    on a machine whose bandwidth changes from second to second, each model's
#    ceiling is taken from the readings around its own rounds. It also
#    measures the multiply-add peak at the start (crates/kernels/examples/
#    int8peak.rs: the int8 instruction the kernels use, and f32 FMA), which
#    the report holds each model's prefill to.
# 3. For each model, ROUNDS rounds of one llama-bench run and one `minnow bench`
#    run each, alternating which goes first, so both engines see the same
#    machine (the cores may be shared); reports each engine's median.
# 4. Prints a markdown table: both engines, the ratios, and the decode ceiling
#    (bandwidth ÷ weight bytes read per generated token) with how close each
#    engine comes to it, from the median of the readings around that model's
#    rounds; and, stricter, whether the decode target also holds against the
#    best reading of the whole run.
# 5. Generation with context: after each model's rounds, DEPTH_ROUNDS more
#    (alternating) of tg GEN_TOKENS with D1 and with D2 tokens already in the
#    KV cache (llama-bench -d, minnow bench -d), and a second table of how much
#    each engine slows from D1 to D2 (issue 5: within 15% from 64 to 1,024).
#    Once per KV cache type of --depth-caches: f16 (both engines' default)
#    and q8_0 (llama-bench -fa 1 -ctk q8_0 -ctv q8_0, its quantized values
#    needing flash attention; minnow --ctk q8_0 --ctv q8_0). Then, minnow
#    alone, the same change measured in one process (`minnow bench -d D2
#    --alternate-depth D1`: decode steps alternating between the two caches,
#    3 × GEN_TOKENS each), which the machine's bandwidth swings do not move
#    as they move separate runs; a third table.
#
# Environment:
#   MINNOW_LLAMACPP_DIR  build cache (default ~/.cache/minnow/llama.cpp)
#   LLAMACPP_VERSION     llama-cpp-python sdist version to build, or "latest"
#                        (default pinned below, so comparisons stay comparable)
#   LLAMACPP_TARGETS     CMake targets to build (default below)
#   MINNOW_COMPARE_OUT   where raw results go (default a new folder in /tmp)
set -euo pipefail

MODELS="smollm2-135m,gemma3-270m,qwen2.5-coder-0.5b,qwen2.5-coder-1.5b"
THREADS=2
ROUNDS=3
PP=128
TG=64
BUILD_ONLY=0
NO_BUILD=0
DEPTHS=64,1024
DEPTH_ROUNDS=2
DEPTH_CACHES=f16,q8_0
LLAMACPP_DIR=${MINNOW_LLAMACPP_DIR:-$HOME/.cache/minnow/llama.cpp}
LLAMACPP_VERSION=${LLAMACPP_VERSION:-0.3.36}
# llama-speculative costs one more file; llama-server (add it when needed) its
# ~20k lines plus the multimodal library: 20+ minutes more on two cores.
LLAMACPP_TARGETS=${LLAMACPP_TARGETS:-llama-bench llama-speculative}

usage() {
    sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'
    echo "Defaults: -m $MODELS -t $THREADS -r $ROUNDS -p $PP -n $TG --depths $DEPTHS --depth-rounds $DEPTH_ROUNDS --depth-caches $DEPTH_CACHES"
}

while [[ $# -gt 0 ]]; do
    case $1 in
        -m|--models) MODELS=$2; shift 2 ;;
        -t|--threads) THREADS=$2; shift 2 ;;
        -r|--rounds|--repeats) ROUNDS=$2; shift 2 ;;
        -p) PP=$2; shift 2 ;;
        -n) TG=$2; shift 2 ;;
        --build-only) BUILD_ONLY=1; shift ;;
        --no-build) NO_BUILD=1; shift ;;
        --depths) DEPTHS=$2; shift 2 ;;
        --depth-rounds) DEPTH_ROUNDS=$2; shift 2 ;;
        --depth-caches) DEPTH_CACHES=$2; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "compare-llamacpp: unknown argument '$1' (try --help)" >&2; exit 2 ;;
    esac
done
for v in THREADS ROUNDS PP TG DEPTH_ROUNDS; do
    [[ ${!v} =~ ^[1-9][0-9]*$ ]] || { echo "compare-llamacpp: $v must be a positive integer" >&2; exit 2; }
done
IFS=, read -r -a cache_list <<<"$DEPTH_CACHES"
for c in "${cache_list[@]}"; do
    [[ $c == f16 || $c == q8_0 ]] || { echo "compare-llamacpp: --depth-caches takes f16 and/or q8_0" >&2; exit 2; }
done
if [[ $DEPTHS == none ]]; then
    depth_list=()
else
    IFS=, read -r -a depth_list <<<"$DEPTHS"
    for d in "${depth_list[@]}"; do
        [[ $d =~ ^[0-9]+$ ]] || { echo "compare-llamacpp: --depths takes numbers, as 64,1024 (or none)" >&2; exit 2; }
    done
fi

REPO=$(cd "$(dirname "$0")/.." && pwd)
log() { echo "[compare] $*" >&2; }

# cmake from PATH, else from the `cmake` package on PyPI (installed if needed).
find_cmake() {
    if command -v cmake >/dev/null; then
        command -v cmake
        return
    fi
    if ! python3 -c 'import cmake' 2>/dev/null; then
        log "cmake not found: installing it from PyPI (python3 -m pip install cmake)"
        python3 -m pip install --quiet cmake >&2
    fi
    python3 -c 'import cmake, os; print(os.path.join(cmake.CMAKE_BIN_DIR, "cmake"))'
}

# Downloads, unpacks and builds llama.cpp; sets LLAMACPP_BIN and LLAMACPP_BUILT.
build_llamacpp() {
    local sdists=$LLAMACPP_DIR/sdist spec sdist version dir
    mkdir -p "$sdists"
    if [[ $LLAMACPP_VERSION == latest ]]; then
        spec=llama-cpp-python
    else
        spec=llama-cpp-python==$LLAMACPP_VERSION
    fi
    sdist=$sdists/llama_cpp_python-$LLAMACPP_VERSION.tar.gz
    if [[ ! -f $sdist ]]; then
        log "downloading the $spec source distribution from PyPI"
        # --no-binary for this package only: its build requirements (cmake,
        # scikit-build-core) may come as wheels, or pip would compile cmake.
        python3 -m pip download --quiet --no-deps --no-binary llama-cpp-python "$spec" -d "$sdists" >&2
        sdist=$(ls -1 "$sdists"/llama_cpp_python-*.tar.gz | sort -V | tail -1)
    fi
    version=${sdist##*/llama_cpp_python-}
    version=${version%.tar.gz}
    dir=$LLAMACPP_DIR/$version
    LLAMACPP_BIN=$dir/build/bin
    LLAMACPP_BUILT="llama-cpp-python $version (vendor/llama.cpp)"

    local missing=() t
    for t in $LLAMACPP_TARGETS; do
        [[ -x $LLAMACPP_BIN/$t ]] || missing+=("$t")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "llama.cpp from $LLAMACPP_BUILT already built in $dir"
        return
    fi
    if [[ ! -f $dir/src/vendor/llama.cpp/CMakeLists.txt ]]; then
        log "unpacking $sdist"
        rm -rf "$dir/src" "$dir/unpack"
        mkdir -p "$dir/unpack"
        tar -xzf "$sdist" -C "$dir/unpack"
        mv "$dir/unpack/llama_cpp_python-$version" "$dir/src"
        rm -rf "$dir/unpack"
    fi
    command -v c++ >/dev/null || { echo "compare-llamacpp: no C++ compiler (apt-get install g++)" >&2; exit 1; }
    local cmake
    cmake=$(find_cmake)
    log "building ${missing[*]} of $LLAMACPP_BUILT (this takes a while on few cores)"
    "$cmake" -S "$dir/src/vendor/llama.cpp" -B "$dir/build" \
        -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_UI=OFF -DLLAMA_USE_PREBUILT_UI=OFF >"$dir/cmake-configure.log" 2>&1 \
        || { tail -30 "$dir/cmake-configure.log" >&2; exit 1; }
    "$cmake" --build "$dir/build" --config Release -j "$(nproc)" --target "${missing[@]}" >"$dir/cmake-build.log" 2>&1 \
        || { tail -30 "$dir/cmake-build.log" >&2; exit 1; }
    log "built into $LLAMACPP_BIN"
}

build_llamacpp
if [[ $BUILD_ONLY -eq 1 ]]; then
    exit 0
fi

MINNOW=$REPO/target/release/minnow
MEMBW=$REPO/target/release/examples/membw
INT8PEAK=$REPO/target/release/examples/int8peak
if [[ $NO_BUILD -eq 0 ]]; then
    log "building minnow and the bandwidth tool"
    (cd "$REPO" && cargo build --quiet --release -p minnow && cargo build --quiet --release -p minnow-kernels --example membw --example int8peak)
fi
for bin in "$MINNOW" "$MEMBW" "$INT8PEAK"; do
    [[ -x $bin ]] || { echo "compare-llamacpp: $bin is missing (run without --no-build)" >&2; exit 1; }
done

OUT=${MINNOW_COMPARE_OUT:-$(mktemp -d "${TMPDIR:-/tmp}/minnow-compare.XXXXXX")}
mkdir -p "$OUT"
RESULTS=$OUT/results.jsonl
# GNU time for each run's peak RSS, where the machine has it (Debian: `time`).
if [[ -x /usr/bin/time ]]; then PEAK_RSS="/usr/bin/time -f %M -o $OUT/rss.txt"; else PEAK_RSS=""; fi
: >"$RESULTS"
# (A reused MINNOW_COMPARE_OUT starts empty too.)
: >"$OUT/models.jsonl"
: >"$OUT/membw-rounds.jsonl"
: >"$OUT/depth.jsonl"
: >"$OUT/alternating.jsonl"
record() { # engine model round others peak-rss-kib json-on-stdin
    python3 -c 'import json, sys
print(json.dumps({"engine": sys.argv[1], "model": sys.argv[2], "round": int(sys.argv[3]),
                  "others_running": int(sys.argv[4]), "max_rss_kib": int(sys.argv[5] or 0),
                  "out": json.load(sys.stdin)}))' "$@" >>"$RESULTS"
}
record_depth() { # engine model depth cache-type json-on-stdin
    python3 -c 'import json, sys
print(json.dumps({"engine": sys.argv[1], "model": sys.argv[2], "depth": int(sys.argv[3]),
                  "cache": sys.argv[4], "out": json.load(sys.stdin)}))' "$@" >>"$OUT/depth.jsonl"
}
# Tasks of other programs runnable right now, into $others (this shell is the
# one subtracted): the cores may be shared, and a busy machine makes the
# comparison unfair. Not `$(...)`: the subshell and this shell, still running
# beside it on another core, would both count, and every run looked busy.
others_running() {
    local _a _b _c running _d
    read -r _a _b _c running _d </proc/loadavg
    others=$((${running%/*} - 1))
}

DATE=$(date -u '+%Y-%m-%d %H:%M UTC')
LOAD_BEFORE=$(cut -d' ' -f1-3 /proc/loadavg)
COMMIT=$(cd "$REPO" && git rev-parse --short HEAD)$(cd "$REPO" && git diff --quiet HEAD -- crates || echo ' with uncommitted changes')

log "measuring the multiply-add peak with $THREADS threads"
"$INT8PEAK" --threads "$THREADS" --json >"$OUT/int8peak.json"
cat "$OUT/int8peak.json" >&2
log "measuring read bandwidth with $THREADS threads"
"$MEMBW" --threads "$THREADS" --json >"$OUT/membw-start.json"
cat "$OUT/membw-start.json" >&2

# One bandwidth reading into membw-rounds.jsonl: model, round, and which
# engine runs next ("-" after a model's last run).
bandwidth() { # model round next
    "$MEMBW" --threads "$THREADS" --json | python3 -c 'import json, sys
r = json.load(sys.stdin)
r.update(model=sys.argv[1], round=int(sys.argv[2]), next=sys.argv[3])
print(json.dumps(r))' "$@" >>"$OUT/membw-rounds.jsonl"
}

IFS=, read -r -a model_list <<<"$MODELS"
for name in "${model_list[@]}"; do
    # A test model's short name, or a GGUF file (e.g. an upcycled model).
    if [[ -f $name ]]; then path=$name; else path=$("$MINNOW" pull "$name" | tail -1); fi
    echo "{\"model\": \"$name\", \"path\": \"$path\"}" >>"$OUT/models.jsonl"
    for ((round = 1; round <= ROUNDS; round++)); do
        # Alternate the order so neither engine always runs on a warmer machine.
        if ((round % 2)); then order="llama minnow"; else order="minnow llama"; fi
        for engine in $order; do
            bandwidth "$name" "$round" "$engine"
            others_running
            log "$name round $round/$ROUNDS: $engine ($others other tasks running)"
            # Peak resident memory of the whole run (GNU time's %M, KiB).
            if [[ $engine == llama ]]; then
                $PEAK_RSS "$LLAMACPP_BIN/llama-bench" -m "$path" -t "$THREADS" -p "$PP" -n "$TG" -r 1 -o json \
                    >"$OUT/run.json" 2>>"$OUT/llama-bench.log"
            else
                $PEAK_RSS "$MINNOW" bench "$path" --threads "$THREADS" -p "$PP" -n "$TG" -r 1 --json >"$OUT/run.json"
            fi
            record "$engine" "$name" "$round" "$others" "$(tail -1 "$OUT/rss.txt" 2>/dev/null || echo 0)" <"$OUT/run.json"
        done
    done
    bandwidth "$name" "$ROUNDS" -
    # Generation after D tokens of context, both engines, alternating.
    for ((round = 1; round <= DEPTH_ROUNDS && ${#depth_list[@]} > 0; round++)); do
        if ((round % 2)); then order="llama minnow"; else order="minnow llama"; fi
        for engine in $order; do
            for cache in "${cache_list[@]}"; do
                if [[ $cache == f16 ]]; then llama_cache=(); minnow_cache=(); else
                    llama_cache=(-fa 1 -ctk "$cache" -ctv "$cache")
                    minnow_cache=(--ctk "$cache" --ctv "$cache")
                fi
                for d in "${depth_list[@]}"; do
                    log "$name depth $d, $cache cache, round $round/$DEPTH_ROUNDS: $engine"
                    if [[ $engine == llama ]]; then
                        "$LLAMACPP_BIN/llama-bench" -m "$path" -t "$THREADS" -p 0 -n "$TG" -d "$d" -r 1 \
                            "${llama_cache[@]}" -o json >"$OUT/run.json" 2>>"$OUT/llama-bench.log"
                    else
                        "$MINNOW" bench "$path" --threads "$THREADS" -p 1 -n "$TG" -d "$d" -r 1 \
                            "${minnow_cache[@]}" --json >"$OUT/run.json"
                    fi
                    record_depth "$engine" "$name" "$d" "$cache" <"$OUT/run.json"
                done
            done
        done
    done
    # minnow's own change from the shallowest to the deepest depth, in one process.
    if ((${#depth_list[@]} >= 2 && DEPTH_ROUNDS > 0)); then
        lo=${depth_list[0]} hi=${depth_list[${#depth_list[@]} - 1]}
        for cache in "${cache_list[@]}"; do
            log "$name depth $lo vs $hi alternating, $cache cache: minnow"
            "$MINNOW" bench "$path" --threads "$THREADS" -n "$TG" -r 3 -d "$hi" --alternate-depth "$lo" \
                --ctk "$cache" --ctv "$cache" --json | python3 -c 'import json, sys
r = json.load(sys.stdin); r.update(model=sys.argv[1]); print(json.dumps(r))' "$name" >>"$OUT/alternating.jsonl"
        done
    fi
done
# Bandwidth again at the end, for the run's best reading.
"$MEMBW" --threads "$THREADS" --json >"$OUT/membw-end.json"
cat "$OUT/membw-end.json" >&2

python3 -c 'import json, sys; print(json.dumps(dict(a.split("=", 1) for a in sys.argv[1:])))' \
    date="$DATE" cpu="$(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')" cpus="$(nproc)" \
    commit="$COMMIT" llamacpp="$LLAMACPP_BUILT" threads="$THREADS" pp="$PP" tg="$TG" rounds="$ROUNDS" \
    load_before="$LOAD_BEFORE" load_after="$(cut -d' ' -f1-3 /proc/loadavg)" >"$OUT/meta.json"

python3 "$REPO/bench/compare_report.py" "$OUT"
log "raw results in $OUT"
