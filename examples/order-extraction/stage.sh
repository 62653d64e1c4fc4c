# Sourced by run.sh and kl.sh: `stage NAME COMMAND...` runs COMMAND and
# records its wall time as "NAME<TAB>seconds" in $timings (set by the caller).
# Stage timings survive a rerun: a stage run again replaces its own line.
touch "$timings"
stage() {
    local name="$1"; shift
    local t0; t0=$(date +%s.%N)
    "$@"
    local t1; t1=$(date +%s.%N)
    grep -v "^$name	" "$timings" > "$timings.tmp" || true
    printf '%s\t%.1f\n' "$name" "$(echo "$t1 - $t0" | bc)" | tee -a "$timings.tmp"
    mv "$timings.tmp" "$timings"
}
