#!/usr/bin/env bash
# CI: build the sdist and wheel, check them with twine, install the wheel into a fresh venv (torch
# first, as the README says) and run the packaged recipes from an empty folder: what a user gets
# from `pip install polytask`, with no clone.
set -euo pipefail
cd "$(dirname "$0")/../.."
repo="$PWD"
start=$SECONDS
scripts/setup.sh
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
quiet() { "$@" 2>&1 | { grep -v "^WARNING: Location" || true; } >&2; return "${PIPESTATUS[0]}"; }
step() { echo "-- $*" >&2; }

step "build sdist and wheel"
quiet .venv/bin/python -m build --outdir "$work/dist" . >/dev/null
wheel="$(ls "$work"/dist/polytask-*.whl)"
ls "$work"/dist/polytask-*.tar.gz >/dev/null
.venv/bin/twine check --strict "$work"/dist/*
unzip -l "$wheel" | grep -q "polytask/recipes/multi-digits.yaml"
unzip -l "$wheel" | grep -q "polytask/recipes/examples/students.csv"

step "fresh venv: torch==2.13.0, then the wheel with the pinned constraints"
"${PYTHON:-python3}" -m venv "$work/venv"
pip=("$work/venv/bin/python" -m pip install --quiet)
quiet "${pip[@]}" "torch==2.13.0"
quiet "${pip[@]}" -c "$repo/constraints.txt" "$wheel"
polytask="$work/venv/bin/polytask"

step "from an empty folder"
mkdir "$work/empty"
cd "$work/empty"
"$polytask" --version | grep -qx "polytask $("$repo/.venv/bin/python" -c 'import polytask; print(polytask.__version__)')"
"$polytask" recipes | tee "$work/recipes.txt"
grep -q "^multi-digits " "$work/recipes.txt"
grep -q "^students-csv " "$work/recipes.txt"
"$polytask" init students-csv students
test -f students/students-csv.yaml && test -f students/examples/students.csv
(cd students && "$polytask" train students-csv.yaml train.epochs=1 --no-progress)
test -f students/runs/students/results.json
"$polytask" train multi-digits train.epochs=1 data.params.num_train=500 data.params.num_val=100 \
  data.params.num_test=100 evaluate.baselines=false --no-progress
test -f runs/multi-digits/results.json
if "$polytask" train no-such-recipe 2>"$work/error.txt"; then
  echo "an unknown recipe should fail" >&2
  exit 1
fi
grep -q "unknown recipe 'no-such-recipe'" "$work/error.txt"
echo "package check passed in $((SECONDS - start)) s" >&2
