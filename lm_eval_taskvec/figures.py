"""Figures as objects: a bare matplotlib ``Figure`` saved to PNG, never pyplot, so that drawing one changes
neither the user's backend nor pyplot's list of open figures (a notebook keeps working as it was)."""

from __future__ import annotations

from pathlib import Path

import matplotlib
from matplotlib.figure import Figure


def new_figure(**kwargs) -> Figure:
    """A figure of its own (``Figure(**kwargs)``), drawn by the Agg canvas when saved."""
    return Figure(**kwargs)


def save(fig: Figure, path: Path, dpi: int = 120) -> None:
    fig.savefig(path, dpi=dpi)


def palette(name: str) -> tuple:
    """The colours of one of matplotlib's listed colormaps (e.g. "tab10", "tab20")."""
    return matplotlib.colormaps[name].colors


def span(values) -> str:
    """ "50" when all values agree, "26–50" otherwise."""
    values = sorted(set(values))
    return str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"
