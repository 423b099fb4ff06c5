#!/usr/bin/env bash
# Trains a multi-task CNN on the built-in multi-digits dataset (plus one single-task baseline per
# task) and prints each task's test metrics and the multi-task gain Δm%.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# multi-digits: the packaged recipe (configs/multi-digits.yaml in a clone)
exec .venv/bin/polytask train multi-digits "$@"
