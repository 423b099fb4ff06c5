#!/usr/bin/env bash
# A longer, randomised run of the property-based fuzz suite (tests/test_fuzz_cli.py): N examples
# per test (default 500) drawn afresh each time, instead of CI's 15 fixed ones. Failing examples
# are printed by Hypothesis with the input that broke the command line.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
POLYTASK_FUZZ_EXAMPLES="${1:-500}" POLYTASK_FUZZ_RANDOM=1 \
  exec .venv/bin/python -m pytest -p no:cacheprovider tests/test_fuzz_cli.py "${@:2}"
