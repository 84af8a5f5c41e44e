#!/usr/bin/env bash
# repvgg-fuse benchmark: our converter vs `cp` and vs PyTorch + timm on a RepVGG-B3 checkpoint.
#
#   bench/run.sh                      # full run
#   BENCH_PAIRS=9 bench/run.sh        # pairs per comparison (default 7, at least 7 recommended)
#   BENCH_RUNS=5 bench/run.sh         # runs of the unpaired commands (default 7; median)
#   BENCH_SKIP_PYTORCH=1 bench/run.sh # only cp + repvgg-fuse (needs the venv only to build b3 once)
#   BENCH_SKIP_RUST=1 bench/run.sh    # only cp + PyTorch (e.g. while the crate does not build)
#   BENCH_PYTHON=/path/to/python      # use an existing interpreter with bench/requirements.txt
#   BENCH_DIR=/some/dir               # cache + scratch dir (default: <crate>/target/bench)
#   BENCH_SKIP_PTH=1 bench/run.sh     # no .pth rows (cp and convert of the same B3 saved by torch.save)
#
# The ratios are medians of PAIRED runs (bench/pairs.sh): cp and convert back to back, PAIRS times,
# alternating which goes first, and the median of the per-pair ratios; likewise the .pth convert
# against cp of the .pth, and `--verify` against PyTorch's per-block check. A slow stretch of a
# shared machine then slows both halves of a pair instead of one side of the comparison. The
# unpaired rows (verify subcommand, inspect, PyTorch's convert) are medians of RUNS runs.
# Wall time: a nanosecond clock around `/usr/bin/time -f '%M'`; peak RSS: its %M (MB = 10^6 B).
# Before every run: outputs deleted, `sync`, input read once to /dev/null (page cache warm).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RUNS="${BENCH_RUNS:-7}"
PAIRS="${BENCH_PAIRS:-7}"
SKIP_PY="${BENCH_SKIP_PYTORCH:-0}"
SKIP_RUST="${BENCH_SKIP_RUST:-0}"
WORK="${BENCH_DIR:-$ROOT/target/bench}"
VENV="$WORK/venv"
CKPT="$WORK/b3.safetensors"
PTH="$WORK/b3.pth"
SKIP_PTH="${BENCH_SKIP_PTH:-0}"
OUT="$WORK/out"
BIN="$ROOT/target/release/repvgg-fuse"

die() { echo "bench: error: $*" >&2; exit 1; }
log() { echo "bench: $*" >&2; }
[[ "$RUNS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_RUNS must be a positive integer, got '$RUNS'"
[[ "$PAIRS" =~ ^[1-9][0-9]*$ ]] || die "BENCH_PAIRS must be a positive integer, got '$PAIRS'"
# shellcheck source=bench/pairs.sh
source "$SCRIPT_DIR/pairs.sh"

mkdir -p "$WORK" "$OUT"

# --- /usr/bin/time --------------------------------------------------------------------------
if [[ ! -x /usr/bin/time ]]; then
    log "installing GNU time (/usr/bin/time missing)"
    SUDO=""; [[ "$(id -u)" -eq 0 ]] || SUDO="sudo"
    $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq time >/dev/null \
        || die "could not install the 'time' package"
fi

# --- build ------------------------------------------------------------------------------------
if [[ "$SKIP_RUST" != 1 ]]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --locked) || die "cargo build --release failed"
    [[ -x "$BIN" ]] || die "$BIN not found after build"
fi

# --- python venv (needed for the checkpoint and the PyTorch baselines) -------------------------
need_py=0
[[ "$SKIP_PY" == 1 ]] || need_py=1
[[ -f "$CKPT" ]] || need_py=1
[[ "$SKIP_PTH" == 1 || -f "$PTH" ]] || need_py=1
PY=""
if [[ "$need_py" == 1 ]]; then
    if [[ -n "${BENCH_PYTHON:-}" ]]; then
        PY="$BENCH_PYTHON"
    else
        if [[ ! -x "$VENV/bin/python" ]]; then
            log "creating venv $VENV (torch from PyPI is a large download)"
            python3 -m venv "$VENV" || die "python3 -m venv failed"
            "$VENV/bin/pip" install -q --upgrade pip || die "pip upgrade failed"
            "$VENV/bin/pip" install -q -r "$SCRIPT_DIR/requirements.txt" || die "pip install failed"
        fi
        PY="$VENV/bin/python"
    fi
    "$PY" -c "import torch, timm, safetensors" || die "$PY lacks torch/timm/safetensors"
fi

# --- checkpoint ---------------------------------------------------------------------------------
if [[ ! -f "$CKPT" ]]; then
    log "generating $CKPT"
    "$PY" "$SCRIPT_DIR/make_b3.py" "$CKPT" || die "make_b3.py failed"
fi
if [[ "$SKIP_PTH" != 1 && ! -f "$PTH" ]]; then
    log "generating $PTH (torch.save of the same state dict)"
    "$PY" "$SCRIPT_DIR/make_b3.py" "$PTH" --pth || die "make_b3.py --pth failed"
fi
SIZE_BYTES=$(stat -c %s "$CKPT")
SIZE_MB=$(awk -v b="$SIZE_BYTES" 'BEGIN{printf "%.1f", b/1e6}')

# --- measurement ----------------------------------------------------------------------------
declare -A P T M   # P[key]: paired result line (see measure_pairs); T/M[key]: unpaired medians
# runs KEY WARM OUT -- CMD...: median wall s and peak MB of RUNS runs into T[KEY], M[KEY].
runs() {
    local key="$1" warm="$2" out="$3"; shift 4
    local ts="" ms="" i t m rep="-"
    [[ "$out" == "-" ]] || rep="${out%.*}.report.json"
    for ((i = 1; i <= RUNS; i++)); do
        read -r t m _ < <(run_once "$warm" "$WORK/.log.$key" "$out" "$rep" -- "$@") || die "$key failed"
        [[ "$out" == "-" || -s "$out" ]] || die "$key wrote no $out"
        log "$key run $i: $t s, $m MB"
        ts+="$t"$'\n'; ms+="$m"$'\n'
    done
    T[$key]=$(printf '%s' "$ts" | median); M[$key]=$(printf '%s' "$ms" | MEDIAN_DIGITS=1 median)
    [[ "$out" == "-" ]] || rm -f "$out" "$rep"
}
pairs() {  # pairs KEY WARM BASE_OUT CMD_OUT -- BASE... -- CMD...
    local key="$1"; shift
    log "$key: $PAIRS pairs"
    P[$key]=$(measure_pairs "$PAIRS" "$@") || die "$key failed"
}

if [[ "$SKIP_RUST" != 1 ]]; then
    pairs convert "$CKPT" "$OUT/copy.safetensors" "$OUT/out.safetensors" -- \
        cp "$CKPT" "$OUT/copy.safetensors" -- "$BIN" "$CKPT" -o "$OUT/out.safetensors" --quiet
    # A deploy file to verify (kept for the `verify` row).
    "$BIN" "$CKPT" -o "$OUT/deploy.safetensors" --quiet || die "convert failed"
    runs verify "$CKPT" - -- "$BIN" verify "$CKPT" "$OUT/deploy.safetensors" --input-size 16x16 --quiet
    runs inspect "$CKPT" - -- "$BIN" inspect "$CKPT"
    if [[ "$SKIP_PY" != 1 ]]; then
        pairs verify_pt "$CKPT" - "$OUT/out2.safetensors" -- \
            "$PY" "$SCRIPT_DIR/pytorch_verify.py" "$CKPT" --input-size 16x16 --quiet -- \
            "$BIN" "$CKPT" -o "$OUT/out2.safetensors" --verify --input-size 16x16 --quiet
        PT_VERIFY_LINE=$(tail -n 1 "$WORK/.log.base")
    fi
    if [[ "$SKIP_PTH" != 1 ]]; then
        PTH_MB=$(awk -v b="$(stat -c %s "$PTH")" 'BEGIN{printf "%.1f", b/1e6}')
        pairs convert_pth "$PTH" "$OUT/copy.pth" "$OUT/out3.safetensors" -- \
            cp "$PTH" "$OUT/copy.pth" -- "$BIN" "$PTH" -o "$OUT/out3.safetensors" --quiet
    fi
    rm -f "$OUT/deploy.safetensors" "$OUT/deploy.report.json"
fi
if [[ "$SKIP_PY" != 1 ]]; then
    runs pt_convert "$CKPT" "$OUT/pt_deploy.safetensors" -- \
        "$PY" "$SCRIPT_DIR/pytorch_convert.py" "$CKPT" "$OUT/pt_deploy.safetensors"
fi

# --- report ------------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
mem=$(awk '/^MemTotal/{printf "%.1f GB", $2/1048576}' /proc/meminfo)
echo
echo "machine: $(nproc) CPUs, ${cpu:-unknown CPU}, $mem RAM, $(uname -sr), load avg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "input:   $CKPT ($SIZE_MB MB); $PAIRS pairs per comparison, $RUNS runs per unpaired command"
[[ "$SKIP_RUST" == 1 ]] || echo "rustc:   $(rustc --version 2>/dev/null || echo '?'), $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')"
[[ "$SKIP_PY" == 1 ]] || echo "python:  $("$PY" -c 'import sys, torch, timm; print(sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "threads", torch.get_num_threads())')"
echo
echo "paired (median of $PAIRS per-pair wall-time ratios, min..max; each side's median wall s and"
echo "peak RSS MB; cpu rat: median per-pair ratio of user+system CPU seconds)"
printf '%-46s %7s %12s %8s %8s %8s %8s %8s\n' "command / baseline" "ratio" "min..max" "cmd s" "base s" "cmd MB" "base MB" "cpu rat"
prow() {
    [[ -n "${P[$1]:-}" ]] || return 0
    local r lo hi bt ct bm cm cr
    read -r r lo hi bt ct bm cm cr <<<"${P[$1]}"
    printf '%-46s %6.2fx %12s %8s %8s %8s %8s %7sx\n' "$2" "$r" "$(printf '%.2f..%.2f' "$lo" "$hi")" "$ct" "$bt" "$cm" "$bm" "$cr"
}
prow convert     "repvgg-fuse convert / cp"
prow convert_pth "repvgg-fuse b3.pth convert / cp of b3.pth"
prow verify_pt   "repvgg-fuse --verify 16x16 / pytorch_verify.py"
echo
echo "unpaired (median of $RUNS)"
printf '%-46s %9s %8s\n' "command" "wall s" "peak MB"
row() { [[ -n "${T[$1]:-}" ]] && printf '%-46s %9s %8s\n' "$2" "${T[$1]}" "${M[$1]}"; return 0; }
row verify     "repvgg-fuse verify TRAIN DEPLOY --input-size 16x16"
row inspect    "repvgg-fuse inspect"
row pt_convert "pytorch_convert.py (timm reparameterize)"
if [[ -n "${P[convert]:-}" ]]; then
    read -r _ _ _ _ _ _ cm _ <<<"${P[convert]}"
    awk -v a="$cm" -v b="$SIZE_MB" 'BEGIN{printf "\nrepvgg-fuse convert peak RSS / input size: %.3fx\n", a/b}'
fi
if [[ -n "${PT_VERIFY_LINE:-}" ]]; then echo; echo "pytorch_verify: $PT_VERIFY_LINE"; fi
rm -f "$WORK"/.log.*
