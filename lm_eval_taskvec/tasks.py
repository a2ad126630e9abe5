"""Where the project's lm-eval task configs live, installed or in a source checkout."""

from __future__ import annotations

from functools import cache
from pathlib import Path


@cache
def task_dir() -> Path:
    here = Path(__file__).resolve().parent
    for candidate in (here / "task_configs", here.parent / "task_configs"):  # wheel, then checkout
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"lm-eval-taskvec task configs not found next to {here}")
