"""Run a script with the checkout's ``.venv`` interpreter, creating it with ``scripts/setup``.

Standard library only: a script calls :func:`ensure_venv` before anything that needs numpy
or mirrorfs is imported.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VENV = ROOT / ".venv"


def ensure_venv(script: str) -> None:
    """Re-exec ``script`` with ``.venv/bin/python`` unless this already is that interpreter.

    Then put the checkout's ``src`` first on ``sys.path``, so the scripts measure this
    checkout's mirrorfs even where another one is installed.
    """
    if Path(sys.prefix).resolve() != VENV.resolve():
        if not (VENV / "bin" / "python").exists():
            subprocess.run([str(ROOT / "scripts" / "setup")], check=True)
        py = str(VENV / "bin" / "python")
        os.execv(py, [py, str(Path(script).resolve()), *sys.argv[1:]])
    sys.path.insert(0, str(ROOT / "src"))
