#!/usr/bin/env bash
# How conversion time and memory grow with model size: timm repvgg_a0, a2, b1 and b3
# checkpoints (made by make_b3.py --model), each converted with the default command and copied
# with cp, same page-cache state, median of BENCH_RUNS (3) runs.
#
#   bench/scaling.sh            # needs a python with torch + timm: BENCH_PYTHON=... or the venv
#   BENCH_DIR=/some/dir         # cache + scratch dir (default: <crate>/target/bench)
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RUNS="${BENCH_RUNS:-3}"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PY="${BENCH_PYTHON:-$WORK/venv/bin/python}"
BIN="$ROOT/target/release/repvgg-fuse"
mkdir -p "$WORK/out"
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
(cd "$ROOT" && cargo build --release --locked >/dev/null 2>&1) || { echo "cargo build failed" >&2; exit 1; }

median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) printf "%.3f", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }
# run OUTFILE cmd... → prints "wall_s rss_mb" (medians)
run() {
    local out="$1"; shift
    local ts="" ms="" t0 t1
    for ((i = 0; i < RUNS; i++)); do
        rm -f "$out" "${out%.safetensors}.report.json"; sync; cat "$ckpt" >/dev/null
        t0=$(date +%s%N)
        /usr/bin/time -f '%M' -o "$WORK/.rss" "$@" >/dev/null
        t1=$(date +%s%N)
        ts+="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f", (b-a)/1e9}')"$'\n'
        ms+="$(awk '{printf "%.1f", $1*1024/1e6}' "$WORK/.rss")"$'\n'
    done
    rm -f "$out" "${out%.safetensors}.report.json"
    echo "$(printf '%s' "$ts" | median) $(printf '%s' "$ms" | median)"
}

printf '%-12s %9s %8s %8s %10s %9s %10s\n' model "size MB" "cp s" "fuse s" "fuse/cp" "RSS MB" "RSS/size"
for model in repvgg_a0 repvgg_a2 repvgg_b1 repvgg_b3; do
    ckpt="$WORK/$model.safetensors"
    [[ "$model" == repvgg_b3 && -f "$WORK/b3.safetensors" ]] && ckpt="$WORK/b3.safetensors"
    [[ -f "$ckpt" ]] || "$PY" "$SCRIPT_DIR/make_b3.py" "$ckpt" --model "$model" >/dev/null
    size=$(stat -c %s "$ckpt")
    read -r cp_s _ < <(run "$WORK/out/copy.safetensors" cp "$ckpt" "$WORK/out/copy.safetensors")
    read -r fu_s fu_m < <(run "$WORK/out/fused.safetensors" "$BIN" "$ckpt" -o "$WORK/out/fused.safetensors" -q)
    awk -v m="$model" -v s="$size" -v c="$cp_s" -v f="$fu_s" -v r="$fu_m" \
        'BEGIN{printf "%-12s %9.1f %8.3f %8.3f %9.2fx %9.1f %9.2fx\n", m, s/1e6, c, f, f/c, r, r/(s/1e6)}'
done
