#!/usr/bin/env bash
# repvgg-fuse benchmark: our converter vs `cp` and vs PyTorch + timm on a RepVGG-B3 checkpoint.
#
#   bench/run.sh                      # full run, 3 repetitions per command (median reported)
#   BENCH_RUNS=5 bench/run.sh         # more repetitions
#   BENCH_SKIP_PYTORCH=1 bench/run.sh # only cp + repvgg-fuse (needs the venv only to build b3 once)
#   BENCH_SKIP_RUST=1 bench/run.sh    # only cp + PyTorch (e.g. while the crate does not build)
#   BENCH_PYTHON=/path/to/python      # use an existing interpreter with bench/requirements.txt
#   BENCH_DIR=/some/dir               # cache + scratch dir (default: <crate>/target/bench)
#   BENCH_SKIP_PTH=1 bench/run.sh     # no .pth rows (cp and convert of the same B3 saved by torch.save)
#
# Wall time is taken with a nanosecond clock around `/usr/bin/time -f '%e %M'` (whose %e only has
# 10 ms resolution, too coarse for `cp`); peak RSS is /usr/bin/time's %M (max resident set, KB).
# Before every run: outputs deleted, `sync`, input read once to /dev/null (page cache warm).
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$SCRIPT_DIR/.." && pwd)"
RUNS="${BENCH_RUNS:-3}"
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
    (cd "$ROOT" && cargo build --release) || die "cargo build --release failed"
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
# measure KEY EXPECT [cleanup_files...] -- cmd args...
# EXPECT: file the command must create, non-empty ("-" for none); it is also deleted between runs.
# Sets RES_T[KEY] (median wall s) and RES_M[KEY] (median peak RSS, MB = 10^6 bytes).
declare -A RES_T RES_M
median() { sort -g | awk '{a[NR]=$1} END{ if (NR%2) printf "%.3f", a[(NR+1)/2]; else printf "%.3f", (a[NR/2]+a[NR/2+1])/2 }'; }
measure() {
    local key="$1" expect="$2"; shift 2
    local cleanup=()
    [[ "$expect" == "-" ]] || cleanup+=("$expect")
    while [[ "$1" != "--" ]]; do cleanup+=("$1"); shift; done
    shift
    local times="" rsss="" i tf lf t0 t1 rc
    tf="$WORK/.time.$key"; lf="$WORK/.log.$key"
    for ((i = 1; i <= RUNS; i++)); do
        rm -f "${cleanup[@]}"
        sync
        cat "${WARM:-$CKPT}" >/dev/null
        t0=$(date +%s%N)
        set +e
        /usr/bin/time -f '%e %M' -o "$tf" "$@" >"$lf" 2>&1
        rc=$?
        set -e
        t1=$(date +%s%N)
        if [[ $rc -ne 0 ]]; then
            echo "bench: error: '$*' exited $rc (run $i of $key); its output:" >&2
            cat "$lf" >&2
            exit 1
        fi
        if [[ "$expect" != "-" && ! -s "$expect" ]]; then
            echo "bench: error: '$*' exited 0 but did not write $expect (run $i of $key); its output:" >&2
            cat "$lf" >&2
            exit 1
        fi
        times+="$(awk -v a="$t0" -v b="$t1" 'BEGIN{printf "%.4f", (b-a)/1e9}')"$'\n'
        rsss+="$(awk 'END{printf "%.1f", $2*1024/1e6}' "$tf")"$'\n'
        log "$key run $i: $(echo "$times" | sed -n "${i}p") s, $(echo "$rsss" | sed -n "${i}p") MB"
    done
    RES_T[$key]=$(printf '%s' "$times" | median)
    RES_M[$key]=$(printf '%s' "$rsss" | median)
    rm -f "${cleanup[@]}" "$tf"
}

measure cp "$OUT/copy.safetensors" -- cp "$CKPT" "$OUT/copy.safetensors"
if [[ "$SKIP_RUST" != 1 ]]; then
    measure convert "$OUT/out.safetensors" "$OUT/out.report.json" -- \
        "$BIN" "$CKPT" -o "$OUT/out.safetensors" --quiet
    measure convert_verify "$OUT/out2.safetensors" "$OUT/out2.report.json" -- \
        "$BIN" "$CKPT" -o "$OUT/out2.safetensors" --verify --input-size 16x16 --quiet
fi
if [[ "$SKIP_PTH" != 1 ]]; then
    PTH_MB=$(awk -v b="$(stat -c %s "$PTH")" 'BEGIN{printf "%.1f", b/1e6}')
    WARM="$PTH" measure cp_pth "$OUT/copy.pth" -- cp "$PTH" "$OUT/copy.pth"
    if [[ "$SKIP_RUST" != 1 ]]; then
        WARM="$PTH" measure convert_pth "$OUT/out3.safetensors" "$OUT/out3.report.json" -- \
            "$BIN" "$PTH" -o "$OUT/out3.safetensors" --quiet
    fi
fi
if [[ "$SKIP_PY" != 1 ]]; then
    measure pt_convert "$OUT/pt_deploy.safetensors" -- \
        "$PY" "$SCRIPT_DIR/pytorch_convert.py" "$CKPT" "$OUT/pt_deploy.safetensors"
    measure pt_verify - -- "$PY" "$SCRIPT_DIR/pytorch_verify.py" "$CKPT" --input-size 16x16 --quiet
    PT_VERIFY_LINE=$(tail -n 1 "$WORK/.log.pt_verify")
fi

# --- report ------------------------------------------------------------------------------------
cpu=$(awk -F': ' '/^model name/{print $2; exit}' /proc/cpuinfo)
mem=$(awk '/^MemTotal/{printf "%.1f GB", $2/1048576}' /proc/meminfo)
echo
echo "machine: $(nproc) CPUs, ${cpu:-unknown CPU}, $mem RAM, $(uname -sr)"
echo "input:   $CKPT ($SIZE_MB MB), runs per command: $RUNS (median)"
[[ "$SKIP_RUST" == 1 ]] || echo "rustc:   $(rustc --version 2>/dev/null || echo '?')"
[[ "$SKIP_PY" == 1 ]] || echo "python:  $("$PY" -c 'import sys, torch, timm; print(sys.version.split()[0], "torch", torch.__version__, "timm", timm.__version__, "threads", torch.get_num_threads())')"
echo
printf '%-44s %10s %12s\n' "command" "wall s" "peak RSS MB"
row() { [[ -n "${RES_T[$1]:-}" ]] && printf '%-44s %10s %12s\n' "$2" "${RES_T[$1]}" "${RES_M[$1]}"; return 0; }
row cp             "cp (baseline)"
row convert        "repvgg-fuse (convert + report)"
row convert_verify "repvgg-fuse --verify --input-size 16x16"
row cp_pth         "cp of b3.pth (baseline for .pth)"
row convert_pth    "repvgg-fuse b3.pth (convert + report)"
row pt_convert     "pytorch_convert.py (timm reparameterize)"
row pt_verify      "pytorch_verify.py --input-size 16x16"
echo
ratio() { awk -v a="$2" -v b="$3" -v l="$1" 'BEGIN{ if (b > 0) printf "%-52s %8.2fx\n", l, a/b; else printf "%-52s %9s\n", l, "n/a" }'; }
if [[ -n "${RES_T[convert]:-}" ]]; then
    ratio "repvgg-fuse time / cp time"               "${RES_T[convert]}" "${RES_T[cp]}"
    ratio "repvgg-fuse peak RSS / input size"         "${RES_M[convert]}" "$SIZE_MB"
fi
if [[ -n "${RES_T[convert_pth]:-}" ]]; then
    ratio "repvgg-fuse b3.pth time / cp of b3.pth time" "${RES_T[convert_pth]}" "${RES_T[cp_pth]}"
    ratio "repvgg-fuse b3.pth peak RSS / .pth size"    "${RES_M[convert_pth]}" "$PTH_MB"
fi
if [[ -n "${RES_T[pt_convert]:-}" ]]; then
    ratio "pytorch convert time / cp time"            "${RES_T[pt_convert]}" "${RES_T[cp]}"
    ratio "pytorch convert peak RSS / input size"     "${RES_M[pt_convert]}" "$SIZE_MB"
fi
if [[ -n "${RES_T[convert_verify]:-}" && -n "${RES_T[pt_verify]:-}" ]]; then
    ratio "repvgg-fuse convert+verify / pytorch verify" "${RES_T[convert_verify]}" "${RES_T[pt_verify]}"
fi
if [[ -n "${RES_T[convert]:-}" && -n "${RES_T[pt_convert]:-}" ]]; then
    ratio "pytorch convert time / repvgg-fuse time"   "${RES_T[pt_convert]}" "${RES_T[convert]}"
fi
if [[ -n "${PT_VERIFY_LINE:-}" ]]; then echo; echo "pytorch_verify: $PT_VERIFY_LINE"; fi
rm -f "$WORK"/.log.*
