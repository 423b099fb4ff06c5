#!/usr/bin/env bash
# CI: execute every tutorial (docs/tutorials/NN-*.md, jupytext Markdown notebooks) from top to
# bottom with nbclient, on the small settings written in them; fails on the first cell error.
# Each notebook runs with docs/tutorials/ as its working directory (as Jupyter would open it),
# one torch thread, and writes its runs into temporary folders. Prints each tutorial's time.
#
#   scripts/ci/30-tutorials.sh                       # all of them
#   scripts/ci/30-tutorials.sh docs/tutorials/03-*.md  # some of them
#   KEEP_NOTEBOOKS=out/ scripts/ci/30-tutorials.sh   # also keep the executed .ipynb files
set -euo pipefail
cd "$(dirname "$0")/../.."
scripts/setup.sh
if ! .venv/bin/python -c "import jupytext, nbclient, nbformat, ipykernel" 2>/dev/null; then
  echo "installing the tutorials extra (jupytext, nbclient, nbformat, ipykernel) into .venv" >&2
  .venv/bin/python -m pip install --quiet -c constraints.txt -e ".[tutorials]" 2>&1 \
    | grep -v "^WARNING: Location" >&2 || true
  .venv/bin/python -c "import jupytext, nbclient, nbformat, ipykernel"
fi
if [ "$#" -gt 0 ]; then
  notebooks=("$@")
else
  notebooks=(docs/tutorials/[0-9][0-9]-*.md)
fi
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 MPLBACKEND=module://matplotlib_inline.backend_inline
export PYTHONWARNINGS="ignore::DeprecationWarning"
.venv/bin/python - "${notebooks[@]}" <<'PY'
import os
import sys
import time
from pathlib import Path

import jupytext
import nbformat
from jupyter_client.kernelspec import NATIVE_KERNEL_NAME
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError

keep = os.environ.get("KEEP_NOTEBOOKS")
times: list[tuple[str, float]] = []
failed: list[str] = []
for name in sys.argv[1:]:
    path = Path(name).resolve()
    notebook = jupytext.read(path)
    plots = 0
    client = NotebookClient(
        notebook,
        timeout=300,  # per cell
        kernel_name=NATIVE_KERNEL_NAME,  # the kernel of this interpreter: .venv's python
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    try:
        client.execute()
    except CellExecutionError as exc:
        failed.append(path.name)
        print(f"FAILED {path.name}:\n{exc}", file=sys.stderr)
    elapsed = time.perf_counter() - start
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            plots += "image/png" in output.get("data", {})
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        nbformat.write(notebook, Path(keep) / (path.stem + ".ipynb"))
    if path.name not in failed and plots == 0:
        failed.append(path.name)
        print(f"FAILED {path.name}: no plot was displayed", file=sys.stderr)
    times.append((path.name, elapsed))
    status = "FAILED" if path.name in failed else "ok"
    print(f"{status:6s} {elapsed:6.1f} s  {path.name}  ({plots} plot(s))", flush=True)
total = sum(t for _, t in times)
print(f"{len(times)} tutorial(s) in {total:.1f} s", flush=True)
if failed:
    print("failed: " + ", ".join(failed), file=sys.stderr)
    sys.exit(1)
PY
