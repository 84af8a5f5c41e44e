#!/usr/bin/env bash
# Fuzzes checkpoint loading, layout detection, planning and fusion on arbitrary bytes for
# SECONDS (default 120), starting from the built-in seed checkpoints and the fixtures: every
# reader the tool has (safetensors, PyTorch zip, PyTorch legacy pickle stream, and ONNX once
# there are fixtures/onnx_*/*.onnx), all through the one entry point, which tells a file's
# format by its bytes.
#
#   fuzz/run.sh [--stable] [SECONDS]
#
# With a nightly toolchain (and without --stable): cargo-fuzz (installed if missing) runs the
# libFuzzer target `load_and_detect` with AddressSanitizer and overflow checks. Otherwise the
# plain-Rust mutation loop `mutate` drives the same entry point on stable (what CI runs:
# .ci/run passes --stable; FUZZ_SEED=N replays the seed it prints). Either way the last line
# says how many executions ran clean; a crash exits non-zero and leaves the input under
# fuzz/artifacts/load_and_detect/.
set -euo pipefail

stable=0
if [ "${1:-}" = --stable ]; then
  stable=1
  shift
fi
seconds=${1:-120}
case $seconds in
  '' | *[!0-9]*) echo "usage: $0 [--stable] [SECONDS]" >&2; exit 2 ;;
esac
cd "$(dirname "$0")"

corpus=corpus/load_and_detect
mkdir -p "$corpus" artifacts/load_and_detect
fixtures=()
for d in ../fixtures/*/; do
  [ -f "$d/train.safetensors" ] && fixtures+=("$d/train.safetensors")
done
# PyTorch checkpoints (torch.save, zip and legacy): the pickle reader is fuzzed through the
# same entry point, since a checkpoint's format is told by its bytes.
for f in ../fixtures/torch_*/*.pth ../fixtures/torch_*/*.pt ../fixtures/torch_*/*.tar; do
  [ -f "$f" ] && fixtures+=("$f")
done
# ONNX models (the ONNX reader, once it lands): same entry point, told by content. Until then
# the glob matches nothing and adds nothing.
for f in ../fixtures/onnx_*/*.onnx; do
  [ -f "$f" ] && fixtures+=("$f")
done
echo "run.sh: ${#fixtures[@]} fixture seeds: $(printf '%s\n' "${fixtures[@]}" | sed -n 's/.*\.//p' | sort | uniq -c | awk '{printf "%s%s %s", (NR>1?", ":""), $1, $2}')" >&2

if [ "$stable" = 0 ] && rustup toolchain list 2>/dev/null | grep -q '^nightly'; then
  if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "run.sh: installing cargo-fuzz" >&2
    cargo install cargo-fuzz
  fi
  # Seeds: one small checkpoint per layout (written by the same crate), and the fixtures.
  cargo run --quiet --locked --release --no-default-features --bin mutate -- --write-seeds "$corpus"
  for f in "${fixtures[@]}"; do
    cp "$f" "$corpus/fixture-$(basename "$(dirname "$f")")-$(basename "$f")"
  done
  log=$(mktemp)
  trap 'rm -f "$log"' EXIT
  status=0
  # -a: debug assertions and overflow checks, so a wrapped size is a finding too.
  cargo +nightly fuzz run -a load_and_detect "$corpus" -- \
    -max_total_time="$seconds" -dict=dict.txt -max_len=262144 -rss_limit_mb=4096 \
    -timeout=20 -print_final_stats=1 2>&1 | tee "$log" | grep -E '^(#[0-9]+.*(pulse|DONE)|Done|==|.*panicked|SUMMARY|artifact)' || true
  status=${PIPESTATUS[0]}
  runs=$(grep -oE '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -n 1 || true)
  if [ "$status" -ne 0 ]; then
    echo "run.sh: libFuzzer found a crash (exit $status); see fuzz/artifacts/load_and_detect/" >&2
    exit 1
  fi
  execs=$(echo "$runs" | awk '{print $2}')
  secs=$(echo "$runs" | awk '{print $5}')
  echo "run.sh: load_and_detect (libFuzzer): ${execs:-?} execs in ${secs:-$seconds} s, no crash"
else
  [ "$stable" = 1 ] || echo "run.sh: no nightly toolchain; using the plain-Rust mutation loop" >&2
  # The tool's warning about the payload fixture's pickle (printed for each mutant of it) is
  # expected and dropped; everything else on stderr (a panic's message) is shown.
  cargo run --quiet --locked --release --no-default-features --bin mutate -- \
    "$seconds" "$corpus" "${fixtures[@]}" 2> >(grep -v '^warning: .*repvgg-fuse-fuzz-[0-9]*\.safetensors: ' >&2)
fi
