#!/usr/bin/env bash
# Convert time and memory of a large re-parameterization family member vs `cp`.
#
#   BENCH_PYTHON=/path/to/python bench/family.sh [MODEL]   # default fastvit_ma36
#
# Builds the train checkpoint once with bench/make_family.py (timm, no network), then the
# median of BENCH_RUNS (3) runs of `cp` and of `repvgg-fuse IN -o OUT --quiet`, wall time and
# peak RSS (/usr/bin/time %M), page cache warm.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODEL="${1:-fastvit_ma36}"
RUNS="${BENCH_RUNS:-3}"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PY="${BENCH_PYTHON:-python3}"
BIN="$ROOT/target/release/repvgg-fuse"
CKPT="$WORK/$MODEL.safetensors"
mkdir -p "$WORK"
(cd "$ROOT" && cargo build --release --quiet)
[[ -f "$CKPT" ]] || "$PY" "$SCRIPT_DIR/make_family.py" "$CKPT" --model "$MODEL"
median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) printf "%.3f", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }
run() {  # run OUT cmd...: prints "median_s median_MB"
    local out="$1"; shift
    local ts="" ms="" i t0 t1
    for ((i = 1; i <= RUNS; i++)); do
        rm -f "$out" "${out%.safetensors}.report.json"; sync; cat "$CKPT" >/dev/null
        t0=$(date +%s%N)
        /usr/bin/time -f '%M' -o "$WORK/.family.time" "$@" >/dev/null
        t1=$(date +%s%N)
        ts+="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f", (b-a)/1e9}')"$'\n'
        ms+="$(awk '{printf "%.1f", $1*1024/1e6}' "$WORK/.family.time")"$'\n'
    done
    rm -f "$out" "${out%.safetensors}.report.json" "$WORK/.family.time"
    echo "$(printf '%s' "$ts" | median) $(printf '%s' "$ms" | median)"
}
read -r cp_t cp_m < <(run "$WORK/family_copy.safetensors" cp "$CKPT" "$WORK/family_copy.safetensors")
read -r fu_t fu_m < <(run "$WORK/family_out.safetensors" "$BIN" "$CKPT" -o "$WORK/family_out.safetensors" --quiet)
size=$(awk -v b="$(stat -c %s "$CKPT")" 'BEGIN{printf "%.1f", b/1e6}')
echo "model $MODEL ($size MB), median of $RUNS"
printf '%-12s %8s s %8s MB\n' cp "$cp_t" "$cp_m" repvgg-fuse "$fu_t" "$fu_m"
awk -v a="$fu_t" -v b="$cp_t" 'BEGIN{printf "repvgg-fuse / cp: %.2fx\n", a/b}'
