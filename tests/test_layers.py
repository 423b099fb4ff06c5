"""The import graph goes one way and has no cycle, and no function is over 80 lines
(``scripts/layers.py``, the rules of docs/architecture.md)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "layers.py"


def _check(root: Path | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, str(SCRIPT), "--check"]
    if root is not None:
        command += ["--root", str(root)]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_polytask_has_one_way_layers_no_cycle_and_short_functions() -> None:
    result = _check()
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 violation(s)" in result.stdout


def _write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "polytask" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checker_finds_upward_and_peer_imports_cycles_and_long_functions(
    tmp_path: Path,
) -> None:
    long_body = "\n".join(f"    x{i} = {i}" for i in range(85))
    root = _write(
        tmp_path,
        {
            "__init__.py": "",
            "tasks.py": "def spec():\n    from polytask.run.single import train_run\n",
            "models/__init__.py": "from polytask.models.encoders import mlp\n",
            "models/encoders.py": "from polytask.data.audio import log_mel\nmlp = 1\n",
            "data/__init__.py": "",
            "data/audio.py": "log_mel = 1\n",
            "data/sources/__init__.py": "from polytask.data.sources import digits\nDATASETS = 1\n",
            "data/sources/digits.py": "from polytask.data.sources import DATASETS\n",
            "run/__init__.py": "",
            "run/single.py": f"def train_run():\n{long_body}\n",
        },
    )
    result = _check(root)
    assert result.returncode == 1
    out = result.stdout
    assert "polytask.tasks imports polytask.run.single (an upper layer: tasks -> run)" in out
    assert "polytask.models.encoders imports polytask.data.audio (a peer: models -> data)" in out
    assert "import cycle: polytask.data.sources <-> polytask.data.sources.digits" in out
    assert "train_run: 86 lines (limit 80)" in out
    assert "4 violation(s)" in out
