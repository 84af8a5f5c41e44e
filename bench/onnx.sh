#!/usr/bin/env bash
# ONNX benchmark (issue 17, item 8): merging a RepVGG-B3 train graph (~490 MB, weights inline)
# against `cp` of the same file and against `onnx.load` + `onnx.save` in Python, peak memory
# against the file, the whole-graph check at the graph's input size, and what a user gets:
# onnxruntime latency of train vs deploy graphs.
#
#   BENCH_PYTHON=/work/venv/py/bin/python bench/onnx.sh      # all of it
#   BENCH_PAIRS=7 bench/onnx.sh                               # pairs per comparison (default 7)
#   BENCH_SKIP_LATENCY=1 bench/onnx.sh                        # no onnxruntime latency table
#
# Also times `--verify` on the same graph converted to f16 (bench/make_b3_train_onnx.py --f16,
# needs onnxconverter-common), 3 pairs. Prints `uptime` first: the load says how noisy it is.
#
# Needs a Python with torch, timm, onnx and onnxruntime (fixtures/requirements-onnx.txt) to
# export the B3 graphs once (bench/make_b3_train_onnx.py) and for the onnx/onnxruntime rows.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PAIRS="${BENCH_PAIRS:-7}"
PY="${BENCH_PYTHON:-python3}"
BIN="$ROOT/target/release/repvgg-fuse"
B3="$WORK/onnx-b3"
source "$SCRIPT_DIR/pairs.sh"

die() { echo "bench: error: $*" >&2; exit 1; }
mkdir -p "$WORK" "$B3"
[[ -x /usr/bin/time ]] || die "/usr/bin/time is missing (apt-get install time)"
(cd "$ROOT" && cargo build --release --locked -q) || die "cargo build --release failed"
if [[ ! -f "$B3/train.onnx" ]]; then
    echo "bench: exporting RepVGG-B3 train and deploy graphs (once)" >&2
    "$PY" "$SCRIPT_DIR/make_b3_train_onnx.py" "$B3" >&2 || die "make_b3_train_onnx.py failed"
fi
train="$B3/train.onnx"
size_mb=$(awk -v b="$(stat -c %s "$train")" 'BEGIN{printf "%.1f", b/1e6}')

report() { # name, measure_pairs line
    read -r ratio rmin rmax bs cs bm cm cpu <<<"$2"
    printf '%-34s %8.3f s vs %7.3f s = %5.2fx (%s..%s), cpu %sx, %7.1f MB = %.2fx the file\n' \
        "$1" "$cs" "$bs" "$ratio" "$rmin" "$rmax" "$cpu" "$cm" "$(awk -v m="$cm" -v f="$size_mb" 'BEGIN{print m/f}')"
}

echo "RepVGG-B3 train graph: $size_mb MB, $PAIRS pairs each; load: $(uptime | sed 's/.*load average: //')"
line=$(measure_pairs "$PAIRS" "$train" "$WORK/cp.onnx" "$WORK/deploy.onnx" -- \
    cp "$train" "$WORK/cp.onnx" -- "$BIN" "$train" -o "$WORK/deploy.onnx" -q) || die "convert failed"
report "convert vs cp" "$line"
line=$(measure_pairs "$PAIRS" "$train" "$WORK/cp.onnx" "$WORK/deploy.onnx" -- \
    cp "$train" "$WORK/cp.onnx" -- "$BIN" "$train" -o "$WORK/deploy.onnx" -q --verify) || die "convert --verify failed"
report "convert --verify (224x224 whole)" "$line"
if [[ ! -f "$B3/train_f16.onnx" ]] && "$PY" -c "import onnxconverter_common" 2>/dev/null; then
    echo "bench: converting the train graph to f16 (once)" >&2
    "$PY" "$SCRIPT_DIR/make_b3_train_onnx.py" "$B3" --f16 >&2 2>/dev/null || die "make_b3_train_onnx.py --f16 failed"
fi
if [[ -f "$B3/train_f16.onnx" ]]; then
    # f16 weights and arithmetic, f32 input/output (keep_io_types); the whole-graph check runs
    # both graphs widened to f32 (verify::graph::Compute::F16AsF32).
    line=$(measure_pairs 3 "$B3/train_f16.onnx" "$WORK/cp.onnx" "$WORK/deploy16.onnx" -- \
        cp "$B3/train_f16.onnx" "$WORK/cp.onnx" -- "$BIN" "$B3/train_f16.onnx" -o "$WORK/deploy16.onnx" -q --verify) \
        || die "convert --verify of the f16 graph failed"
    report "f16 graph: convert --verify" "$line"
fi
if "$PY" -c "import onnx" 2>/dev/null; then
    line=$(measure_pairs 3 "$train" "$WORK/deploy.onnx" "$WORK/saved.onnx" -- \
        "$BIN" "$train" -o "$WORK/deploy.onnx" -q -- \
        "$PY" -c "import onnx,sys; onnx.save(onnx.load(sys.argv[1]), sys.argv[2])" "$train" "$WORK/saved.onnx") \
        || die "onnx.load + onnx.save failed"
    report "onnx.load + onnx.save vs convert" "$line"
fi
if [[ "${BENCH_SKIP_LATENCY:-0}" != 1 ]] && "$PY" -c "import onnxruntime" 2>/dev/null; then
    echo "onnxruntime latency, train vs deploy (the payoff):"
    "$PY" "$SCRIPT_DIR/onnx_latency.py" --runs 10
fi
