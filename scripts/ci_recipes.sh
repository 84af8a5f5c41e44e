#!/usr/bin/env bash
# Runs the `repvgg-fuse` lines of the README's two CI recipes ("In CI": the GitHub Actions job's
# `run:` steps and the GitLab CI job's `script:`), taken from README.md exactly as written, on the
# timm fixture, twice:
#   pass: EXPORTED is timm's own deploy file        -> every line exits 0
#   fail: EXPORTED has one fused bias set to 1000    -> the verify line exits 1
# and checks what the jobs publish: the JUnit files, the reports, the deploy file, and for the
# GitHub job the job summary and the ::error lines. The install lines are not run: the binary
# under test is put on PATH instead (REPVGG_FUSE, else target/release or target/debug).
# Needs bash and coreutils only; `cargo test` runs it (tests/ci.rs).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
readme="$repo/README.md"
fixture="$repo/fixtures/timm_repvgg"

bin=${REPVGG_FUSE:-}
if [[ -z "$bin" ]]; then
    for b in "$repo/target/release/repvgg-fuse" "$repo/target/debug/repvgg-fuse"; do
        if [[ -x "$b" ]]; then bin=$b; break; fi
    done
fi
[[ -n "$bin" && -x "$bin" ]] || { echo "ci_recipes: no repvgg-fuse binary (build it, or set REPVGG_FUSE)" >&2; exit 2; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin"
ln -s "$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")" "$work/bin/repvgg-fuse"

fail() { echo "ci_recipes: FAILED: $*" >&2; exit 1; }

# The lines of the fenced block that follows the line starting with "$1" in the README.
block_after() {
    awk -v head="$1" '
        index($0, head) == 1 { found = 1; next }
        found && /^```/ { if (inside) exit; inside = 1; next }
        inside { print }
    ' "$readme"
}
github=$(block_after "GitHub Actions (" | sed -n 's/^ *- run: \(repvgg-fuse .*\)$/\1/p')
gitlab=$(block_after "GitLab CI (" | sed -n 's/^ *- \(repvgg-fuse .*\)$/\1/p')
[[ $(grep -c . <<<"$github") == 2 ]] || fail "expected 2 repvgg-fuse lines in the GitHub recipe, got: $github"
[[ $(grep -c . <<<"$gitlab") == 2 ]] || fail "expected 2 repvgg-fuse lines in the GitLab recipe, got: $gitlab"

# A copy of timm's deploy file with one element of `stages.1.0.reparam_conv.bias` set to 1000.0
# (F32 little-endian 00 00 7a 44), found through the safetensors header.
tamper() {
    local src=$1 dst=$2 tensor=stages.1.0.reparam_conv.bias
    cp "$src" "$dst"
    local n header begin
    n=$(od -An -t u8 -N 8 "$dst" | tr -d ' ')
    header=$(dd if="$dst" bs=1 skip=8 count="$n" status=none)
    begin=$(grep -o "\"$tensor\":{[^}]*}" <<<"$header" | sed -n 's/.*"data_offsets":\[\([0-9]*\),.*/\1/p')
    [[ -n "$begin" ]] || fail "no $tensor in $src"
    printf '\x00\x00\x7a\x44' | dd of="$dst" bs=1 seek=$((8 + n + begin + 4 * 3)) conv=notrunc status=none
    cmp -s "$src" "$dst" && fail "tampering changed nothing"
    return 0
}

# run_job NAME LINES EXPORTED EXPECTED_LAST_EXIT: runs each line in a fresh folder like a job.
run_job() {
    local name=$1 lines=$2 exported=$3 expect=$4
    local dir="$work/$name"
    mkdir -p "$dir/checkpoints"
    cp "$fixture/train.safetensors" "$dir/checkpoints/train.safetensors"
    cp "$exported" "$dir/checkpoints/deploy.safetensors"
    # A job's environment: its variables, and the GitHub runner's for the GitHub job only.
    local env=(-u GITHUB_ACTIONS -u GITHUB_STEP_SUMMARY PATH="$work/bin:$PATH"
        TRAIN=checkpoints/train.safetensors EXPORTED=checkpoints/deploy.safetensors)
    if [[ $name == github* ]]; then
        env+=(GITHUB_ACTIONS=true GITHUB_STEP_SUMMARY="$dir/summary.md")
    fi
    local code=0 line
    while IFS= read -r line; do
        code=0
        (cd "$dir" && env "${env[@]}" bash -c "$line") >"$dir/out" 2>"$dir/err" || code=$?
        echo "  [$name] \$ $line  -> exit $code"
        [[ $code == 0 ]] || break
    done <<<"$lines"
    [[ $code == "$expect" ]] || { cat "$dir/err" >&2; fail "$name: last exit $code, expected $expect"; }
    for f in deploy.safetensors deploy.report.json repvgg-fuse-convert.xml repvgg-fuse-verify.xml exported.report.json; do
        [[ -s "$dir/$f" ]] || fail "$name: the job did not leave $f"
    done
    grep -q 'failures="0"' "$dir/repvgg-fuse-convert.xml" || fail "$name: convert JUnit has failures"
    if [[ $expect == 0 ]]; then
        grep -q 'failures="0"' "$dir/repvgg-fuse-verify.xml" || fail "$name: verify JUnit has failures"
        grep -q '"passed": true' "$dir/exported.report.json" || fail "$name: report not passed"
    else
        grep -q 'failures="1"' "$dir/repvgg-fuse-verify.xml" || fail "$name: verify JUnit lacks the failure"
        grep -q 'name="stages.1.0" time="0">' "$dir/repvgg-fuse-verify.xml" || fail "$name: the failing testcase is not stages.1.0"
        grep -q '"passed": false' "$dir/exported.report.json" || fail "$name: report says passed"
    fi
    if [[ $name == github* ]]; then
        [[ $(grep -c '^### repvgg-fuse' "$dir/summary.md") == 2 ]] || fail "$name: job summary not appended twice"
        if [[ $expect == 0 ]]; then
            ! grep -q '^::error' "$dir/err" || fail "$name: ::error lines on a passing run"
        else
            grep -q '^::error title=repvgg-fuse%3A block stages.1.0 failed verification::' "$dir/err" || fail "$name: no ::error line"
        fi
    fi
}

tamper "$fixture/deploy.safetensors" "$work/tampered.safetensors"
run_job github-pass "$github" "$fixture/deploy.safetensors" 0
run_job github-fail "$github" "$work/tampered.safetensors" 1
run_job gitlab-pass "$gitlab" "$fixture/deploy.safetensors" 0
run_job gitlab-fail "$gitlab" "$work/tampered.safetensors" 1
echo "ci_recipes: 4 passed, 0 failed"
