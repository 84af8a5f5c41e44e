#!/usr/bin/env bash
# How conversion time and memory grow with model size: timm repvgg_a0, a2, b1 and b3
# checkpoints (made by make_b3.py --model), each converted with the default command and copied
# with cp, same page-cache state, as BENCH_PAIRS (7) pairs run in turn (bench/pairs.sh).
#
#   bench/scaling.sh            # needs a python with torch + timm: BENCH_PYTHON=... or the venv
#   BENCH_DIR=/some/dir         # cache + scratch dir (default: <crate>/target/bench)
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PY="${BENCH_PYTHON:-$WORK/venv/bin/python}"
BIN="$ROOT/target/release/repvgg-fuse"
mkdir -p "$WORK/out"
export WORK
[[ -x /usr/bin/time ]] || { apt-get update -qq && apt-get install -y -qq time >/dev/null; }
(cd "$ROOT" && cargo build --release --locked >/dev/null 2>&1) || { echo "cargo build failed" >&2; exit 1; }

# shellcheck source=bench/pairs.sh
source "$SCRIPT_DIR/pairs.sh"
PAIRS="${BENCH_PAIRS:-7}"

echo "median of $PAIRS (cp, convert) pairs; fuse/cp: median per-pair wall ratio; cpu: the same for CPU seconds"
printf '%-12s %9s %8s %8s %10s %9s %10s %9s\n' model "size MB" "cp s" "fuse s" "fuse/cp" "RSS MB" "RSS/size" "cpu"
for model in repvgg_a0 repvgg_a2 repvgg_b1 repvgg_b3; do
    ckpt="$WORK/$model.safetensors"
    [[ "$model" == repvgg_b3 && -f "$WORK/b3.safetensors" ]] && ckpt="$WORK/b3.safetensors"
    [[ -f "$ckpt" ]] || "$PY" "$SCRIPT_DIR/make_b3.py" "$ckpt" --model "$model" >/dev/null
    size=$(stat -c %s "$ckpt")
    read -r ratio _ _ cp_s fu_s _ fu_m cpu_r < <(measure_pairs "$PAIRS" "$ckpt" "$WORK/out/copy.safetensors" \
        "$WORK/out/fused.safetensors" -- cp "$ckpt" "$WORK/out/copy.safetensors" -- \
        "$BIN" "$ckpt" -o "$WORK/out/fused.safetensors" -q 2>"$WORK/.scaling.log") || { cat "$WORK/.scaling.log" >&2; exit 1; }
    awk -v m="$model" -v s="$size" -v c="$cp_s" -v f="$fu_s" -v q="$ratio" -v r="$fu_m" -v u="$cpu_r" \
        'BEGIN{printf "%-12s %9.1f %8.3f %8.3f %9.2fx %9.1f %9.2fx %8sx\n", m, s/1e6, c, f, q, r, r/(s/1e6), u}'
done
