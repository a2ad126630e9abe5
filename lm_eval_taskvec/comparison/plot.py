"""compare.png: grouped bars per task and group mean, one bar per column, stderr whiskers, a bracket with `*`
over each pair of columns whose paired test has p < ALPHA (the paper's Figure 4)."""

from __future__ import annotations

from pathlib import Path

from matplotlib.colors import to_hex
from matplotlib.lines import Line2D

from lm_eval_taskvec.comparison.table import Comparison, model_title, whole
from lm_eval_taskvec.figures import new_figure, palette, save, span
from lm_eval_taskvec.stats import ALPHA

MODE_COLORS = {"baseline": "#9e9e9e", "hypothesis": "#1f77b4", "regular": "#ff7f0e"}
ZERO_MARK = 2.5  # line width of the mark that stands for a bar of height 0


def title(table: Comparison) -> str:
    """The model (when the columns hold one), then n, shots and limit as sweep.png gives them."""
    lines = []
    models = {model_title(c.run) for c in table.columns}
    if len(models) == 1:
        lines.append(models.pop())
    tasks = [r for r in table.rows if r.kind == "task"]
    ns = [cell["n"] for r in tasks for cell in r.cells.values() if cell and cell["n"] is not None]
    shots = [
        shot
        for r in tasks
        for c in table.columns
        if (run := c.run_for(r.name)) and r.cells.get(c.label) and (shot := run.task_info(r.name)["n-shot"]) is not None
    ]
    limits = {str(whole(c.run.limit)) for c in table.columns if c.run.limit is not None}
    settings = [
        f"n = {span(ns)} documents per task" if ns else "",
        f"{span(shots)}-shot" if shots else "",
        f"limit {' / '.join(sorted(limits))}" if limits else "no limit",
    ]
    lines.append(", ".join(s for s in settings if s))
    return "\n".join(lines)


def plot(table: Comparison, path: Path) -> None:
    save(figure(table), path)


def figure(table: Comparison):
    """The bars, whiskers, zero marks and significance brackets of ``table``, titled and explained in the legend."""
    tasks = [r for r in table.rows if r.kind == "task"]
    groups = [r for r in table.rows if r.kind == "group"]
    rows = tasks + groups
    positions = list(range(len(tasks))) + [len(tasks) + 0.6 + i for i in range(len(groups))]
    width = 0.8 / len(table.columns)
    modes = [c.run.mode for c in table.columns if c.run.mode]
    by_mode = len(modes) == len(set(modes))  # one model's modes: the paper's colours; else a colour per column
    others = iter(c for c in map(to_hex, palette("tab10")) if c not in MODE_COLORS.values())
    fig = new_figure(figsize=(max(6.0, 0.25 * len(table.columns) * len(rows) + 2), 4.5))
    ax = fig.subplots()
    x_of = {}  # (column label, row name) -> the bar's centre
    tops = {}  # (column label, row name) -> the top of its whisker
    for i, column in enumerate(table.columns):
        color = (MODE_COLORS.get(column.run.mode) if by_mode else None) or next(others, None)
        offset = (i - (len(table.columns) - 1) / 2) * width
        drawn = [
            (x + offset, row, cell)
            for x, row in zip(positions, rows)
            if (cell := row.cells.get(column.label)) and cell.get("value") is not None
        ]  # missing: no bar
        for x, row, cell in drawn:
            x_of[column.label, row.name] = x
            tops[column.label, row.name] = cell["value"] + (cell.get("stderr") or 0)
        ax.bar(
            [x for x, _, _ in drawn],
            [c["value"] for _, _, c in drawn],
            width,
            yerr=[c.get("stderr") or 0 for _, _, c in drawn],
            capsize=1.5,
            color=color,
            label=column.label,
            error_kw={"lw": 0.7},
        )
        for x, row, cell in drawn:
            if cell["value"] == 0:  # a bar of height 0 would not show: a thick line at 0 in the bar's colour
                ax.plot(
                    [x - width / 2, x + width / 2],
                    [0, 0],
                    color=color,
                    lw=ZERO_MARK,
                    solid_capstyle="butt",
                    gid=f"zero:{column.label}:{row.name}",
                    zorder=3,
                )
    ax.set_xticks(positions)
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=8)
    for label in ax.get_xticklabels()[len(tasks) :]:
        label.set_fontweight("bold")
    if groups and tasks:
        ax.axvline(len(tasks) - 0.2, color="black", lw=0.8, ls=":")
    metrics = sorted({r.metric.split(",", 1)[0] for r in rows if r.metric})
    ax.set_ylabel(" / ".join(metrics))
    values = [c["value"] for r in rows for c in r.cells.values() if c and c["value"] is not None]
    top = max((t for t in tops.values()), default=1)
    unit = top <= 1 and min(values, default=0) >= 0  # scores in [0, 1]: the same scale for every plot
    step = 0.06 * (1 if unit else max(top, 1e-9))
    highest = _significance(ax, table, rows, x_of, tops, step)
    if unit:
        ax.set_ylim(-0.02, max(1.02, highest + step))  # below 0: room for the marks of zero bars
        ax.set_yticks([0, 0.2, 0.4, 0.6, 0.8, 1.0])
    ax.set_title(title(table), fontsize=9)
    handles, _ = ax.get_legend_handles_labels()
    handles.append(Line2D([], [], color="black", marker="|", ms=7, ls="", label="whiskers: ± stderr (lm-eval's)"))
    if any(d["p"] is not None for r in rows for d in r.derived.values()):
        handles.append(
            Line2D(
                [],
                [],
                color="black",
                marker="$*$",
                ms=7,
                ls="",
                label=f"bracket with *: p < {ALPHA} in a paired test\nof the two columns it joins (p in compare.json)",
            )
        )
    ax.legend(handles=handles, fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    return fig


def _significance(ax, table: Comparison, rows, x_of: dict, tops: dict, step: float) -> float:
    """A bracket with `*` over the two bars of each significant pair, stacked per row; returns the highest one."""
    highest = 0.0
    for row in rows:
        level = None
        for pair in table.pairs:
            derived = row.derived.get(pair.name) or {}
            ends = [x_of.get((c.label, row.name)) for c in (pair.a, pair.b)]
            if not derived.get("significant") or derived.get("value") is None or None in ends:
                continue
            low, high = sorted(ends)
            under = [t for (label, name), t in tops.items() if name == row.name and low <= x_of[label, name] <= high]
            y = max(max(under) + step / 2, level + step if level is not None else 0)
            level = y
            ax.plot(
                [low, low, high, high],
                [y - step / 4, y, y, y - step / 4],
                color="black",
                lw=0.7,
                gid=f"sig:{pair.name}:{row.name}",
                zorder=4,
            )
            ax.text((low + high) / 2, y, "*", ha="center", va="bottom", fontsize=9, gid=f"star:{pair.name}:{row.name}")
            highest = max(highest, y + step / 2)
    return highest
