#!/usr/bin/env bash
# `pip install .` in a fresh venv, then the installed `repvgg-fuse` on a fixture: the README's
# pip command, end to end. Needs the package registries (maturin from PyPI, crates from
# crates.io unless cargo has them) and a Rust toolchain, so it is not part of .ci/run.
#   PYTHON=python3.12 scripts/pip_install_check.sh     # another interpreter (default python3)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

step() { printf '== %s (%ss)\n' "$1" "$SECONDS"; }
fail() { echo "pip_install_check: FAILED: $*" >&2; exit 1; }

step "fresh venv with $("$python" --version)"
"$python" -m venv "$work/venv"
venv_bin="$work/venv/bin"

step "pip install $repo"
"$venv_bin/python" -m pip install --quiet --disable-pip-version-check "$repo"

step "the command is on the venv's PATH"
found=$(PATH="$venv_bin:/usr/bin:/bin" command -v repvgg-fuse) || fail "repvgg-fuse not on the venv's PATH"
[[ $found == "$venv_bin/repvgg-fuse" ]] || fail "repvgg-fuse resolves to $found"
want="repvgg-fuse $(sed -n 's/^version = "\(.*\)"$/\1/p' "$repo/Cargo.toml" | head -1)"
got=$(PATH="$venv_bin:/usr/bin:/bin" repvgg-fuse --version)
[[ $got == "$want" ]] || fail "--version says '$got', Cargo.toml '$want'"
echo "$got"

step "convert fixtures/timm_repvgg/train.safetensors with --verify"
PATH="$venv_bin:/usr/bin:/bin" repvgg-fuse "$repo/fixtures/timm_repvgg/train.safetensors" \
    -o "$work/deploy.safetensors" --verify --junit "$work/junit.xml"
[[ -s $work/deploy.safetensors && -s $work/deploy.report.json ]] || fail "no deploy file or report"
grep -q 'failures="0"' "$work/junit.xml" || fail "JUnit has failures"

step "verify timm's own deploy file"
PATH="$venv_bin:/usr/bin:/bin" repvgg-fuse verify -q "$repo/fixtures/timm_repvgg/train.safetensors" \
    "$repo/fixtures/timm_repvgg/deploy.safetensors"

step "done"
echo "pip_install_check: 1 passed, 0 failed"
