#!/usr/bin/env bash
# Instructions executed by a conversion, this tree against another revision, counted by
# callgrind: unlike wall time, the count does not move with the machine's load, so an engine
# change can be judged on a busy (or virtual) machine.
#
#   bench/instructions.sh e6b0d93              # HEAD's working tree vs revision e6b0d93
#   BENCH_MODEL=repvgg_a2 bench/instructions.sh REV
#
# Needs valgrind (apt-get install valgrind) and the bench venv's Python for the checkpoint
# (built once by bench/make_b3.py, as bench/run.sh does). Prints both counts, the ratio, and
# whether the two deploy files are byte-identical.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REV="${1:?usage: bench/instructions.sh REVISION}"
MODEL="${BENCH_MODEL:-repvgg_a0}"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
PY="${BENCH_PYTHON:-$WORK/venv/bin/python}"
CKPT="$WORK/$MODEL.safetensors"
OLD="$WORK/rev-$REV"

command -v valgrind >/dev/null || { echo "instructions: valgrind is not installed" >&2; exit 2; }
mkdir -p "$WORK"
[[ -f "$CKPT" ]] || "$PY" "$ROOT/bench/make_b3.py" "$CKPT" --model "$MODEL"

(cd "$ROOT" && cargo build --release --locked -q)
if [[ ! -x "$OLD/target/release/repvgg-fuse" ]]; then
    rm -rf "$OLD"
    git -C "$ROOT" worktree add -q --detach "$OLD" "$REV"
    (cd "$OLD" && cargo build --release --locked -q)
fi

count() { # binary, output → instructions
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$1" "$CKPT" -o "$2" -q 2>&1 \
        | sed -n 's/.*I *refs: *//p' | tr -d ','
}
new=$(count "$ROOT/target/release/repvgg-fuse" "$WORK/instr-new.safetensors")
old=$(count "$OLD/target/release/repvgg-fuse" "$WORK/instr-old.safetensors")
echo "model $MODEL: $REV $old instructions, working tree $new, ratio $(python3 -c "print(f'{$new/$old:.4f}')")"
if cmp -s "$WORK/instr-new.safetensors" "$WORK/instr-old.safetensors"; then
    echo "deploy files byte-identical"
else
    echo "deploy files differ"
fi
