#!/usr/bin/env bash
# Convert time and memory of a large re-parameterization family member vs `cp`.
#
#   BENCH_PYTHON=/path/to/python bench/family.sh [MODEL]   # default fastvit_ma36
#   BENCH_PAIRS=9 bench/family.sh repvit_m2_3              # pairs (default 7)
#
# Builds the train checkpoint once with bench/make_family.py (timm, no network), then runs
# `cp` and `repvgg-fuse IN -o OUT --quiet` as BENCH_PAIRS pairs in turn (bench/pairs.sh: page
# cache warm, alternating which goes first) and prints the median of the per-pair wall-time
# ratios, its range, each side's median wall time and peak RSS, and the median CPU-time ratio.
set -euo pipefail
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
MODEL="${1:-fastvit_ma36}"
PAIRS="${BENCH_PAIRS:-7}"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PY="${BENCH_PYTHON:-python3}"
BIN="$ROOT/target/release/repvgg-fuse"
CKPT="$WORK/$MODEL.safetensors"
[[ "$PAIRS" =~ ^[1-9][0-9]*$ ]] || { echo "BENCH_PAIRS must be a positive integer" >&2; exit 1; }
mkdir -p "$WORK"
export WORK
# shellcheck source=bench/pairs.sh
source "$SCRIPT_DIR/pairs.sh"
(cd "$ROOT" && cargo build --release --locked --quiet)
[[ -f "$CKPT" ]] || "$PY" "$SCRIPT_DIR/make_family.py" "$CKPT" --model "$MODEL"
read -r ratio lo hi cp_t fu_t cp_m fu_m cpu_r < <(measure_pairs "$PAIRS" "$CKPT" \
    "$WORK/family_copy.safetensors" "$WORK/family_out.safetensors" -- \
    cp "$CKPT" "$WORK/family_copy.safetensors" -- \
    "$BIN" "$CKPT" -o "$WORK/family_out.safetensors" --quiet)
rm -f "$WORK"/.log.base "$WORK"/.log.cmd
size=$(awk -v b="$(stat -c %s "$CKPT")" 'BEGIN{printf "%.1f", b/1e6}')
echo "model $MODEL ($size MB), median of $PAIRS (cp, convert) pairs"
printf '%-12s %8s s %8s MB\n' cp "$cp_t" "$cp_m" repvgg-fuse "$fu_t" "$fu_m"
printf 'repvgg-fuse / cp: %.2fx (pairs %.2f..%.2f), cpu %sx\n' "$ratio" "$lo" "$hi" "$cpu_r"
