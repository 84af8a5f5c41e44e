#!/usr/bin/env bash
# Time the whole-graph check of RepVGG-B3 (train graph and deploy graph, each loaded, run once
# on the same seeded 1x3x224x224 input, outputs compared) through tract, at each of tract's
# optimization levels, against onnxruntime (1 thread and default threads; graph optimizations
# off and on). Wall time and peak RSS of each from /usr/bin/time.
#
#   bash bench/onnx_run.sh [DIR]     # DIR defaults to /tmp/repvgg_b3_onnx
#
# Makes DIR/train.onnx and DIR/deploy.onnx with bench/make_b3_onnx.py when missing. Uses
# /work/venv/py/bin/python unless PYTHON is set. Prints one line per run.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-/tmp/repvgg_b3_onnx}
PY=${PYTHON:-/work/venv/py/bin/python}
[ -f "$DIR/train.onnx" ] && [ -f "$DIR/deploy.onnx" ] && [ -f "$DIR/deploy_f16.onnx" ] ||
  "$PY" bench/make_b3_onnx.py "$DIR"
ls -l "$DIR"/train.onnx "$DIR"/deploy.onnx "$DIR"/deploy_f16.onnx

# Build the test binary once; its path is the one cargo reports for the `onnx_run` test.
BIN=$(cargo test --release --test onnx_run --no-run --message-format=json 2>/dev/null |
  "$PY" -c 'import json,sys
for l in sys.stdin:
    m = json.loads(l)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "onnx_run" and m.get("executable"):
        print(m["executable"])')

measure() { # label, command...
  local label=$1; shift
  local log; log=$(mktemp)
  /usr/bin/time -f "%e %M" -o "$log.time" "$@" >"$log" 2>&1 || { cat "$log"; exit 1; }
  read -r secs kb <"$log.time"
  printf '%-34s wall %6.2f s  peak RSS %5d MB  | %s\n' "$label" "$secs" $((kb / 1024)) \
    "$(grep -oE '(tract [A-Z]|ort ORT).*' "$log" | tail -1)"
  rm -f "$log" "$log.time"
}

for opt in optimized decluttered typed; do
  measure "tract $opt (1 thread)" env ONNX_RUN_BENCH_TRAIN="$DIR/train.onnx" \
    ONNX_RUN_BENCH_DEPLOY="$DIR/deploy.onnx" ONNX_RUN_BENCH_OPT=$opt \
    "$BIN" --ignored --exact bench_whole_graph_check --nocapture --test-threads 1
done

# tract's f16 path: the deploy graph converted to f16 inside (f32 input and output)
measure "tract optimized, f16 deploy" env ONNX_RUN_BENCH_TRAIN="$DIR/train.onnx" \
  ONNX_RUN_BENCH_DEPLOY="$DIR/deploy_f16.onnx" ONNX_RUN_BENCH_OPT=optimized \
  "$BIN" --ignored --exact bench_whole_graph_check --nocapture --test-threads 1

ORT=$(cat <<'EOF'
import sys, time
import numpy as np
import onnxruntime as ort
train, deploy, threads, level = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
so = ort.SessionOptions()
so.intra_op_num_threads = threads
so.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 224, 224)).astype(np.float32)
t = time.perf_counter(); out = []; phases = []
for p in (train, deploy):
    t0 = time.perf_counter(); s = ort.InferenceSession(p, so, providers=["CPUExecutionProvider"])
    t1 = time.perf_counter(); out.append(s.run(None, {"x": x})[0]); t2 = time.perf_counter()
    phases.append(f"load {t1 - t0:.2f} s run {t2 - t1:.2f} s"); del s
print(f"ort {level} threads={threads}: train {phases[0]}; deploy {phases[1]}; total {time.perf_counter() - t:.2f} s; "
      f"max|a-b| {np.abs(out[0] - out[1]).max():.3e} max|a| {np.abs(out[0]).max():.3e}")
EOF
)
for level in ORT_DISABLE_ALL ORT_ENABLE_ALL; do
  for threads in 1 0; do
    measure "onnxruntime $level threads=$threads" "$PY" -c "$ORT" "$DIR/train.onnx" "$DIR/deploy.onnx" $threads $level
  done
done
measure "onnxruntime ORT_DISABLE_ALL 1, f16 deploy" "$PY" -c "$ORT" "$DIR/train.onnx" "$DIR/deploy_f16.onnx" 1 ORT_DISABLE_ALL
