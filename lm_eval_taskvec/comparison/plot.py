"""compare.png: grouped bars per task and group mean, one bar per column, stderr bars (the paper's Figure 4)."""

from __future__ import annotations

from pathlib import Path

from lm_eval_taskvec.comparison.table import Comparison

MODE_COLORS = {"baseline": "#9e9e9e", "hypothesis": "#1f77b4", "regular": "#ff7f0e"}


def plot(table: Comparison, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise ImportError("compare.png needs matplotlib: pip install 'lm-eval-taskvec[plot]', or pass --no_plot "
                          "(plot=False)") from None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import to_hex

    tasks = [r for r in table.rows if r.kind == "task"]
    groups = [r for r in table.rows if r.kind == "group"]
    rows = tasks + groups
    positions = list(range(len(tasks))) + [len(tasks) + 0.6 + i for i in range(len(groups))]
    width = 0.8 / len(table.columns)
    modes = [c.run.mode for c in table.columns if c.run.mode]
    by_mode = len(modes) == len(set(modes))  # one model's modes: the paper's colours; else a colour per column
    others = iter(c for c in map(to_hex, plt.get_cmap("tab10").colors) if c not in MODE_COLORS.values())
    fig, ax = plt.subplots(figsize=(max(6.0, 0.25 * len(table.columns) * len(rows) + 2), 4.5))
    for i, column in enumerate(table.columns):
        cells = [row.cells.get(column.label) or {} for row in rows]
        values = [c.get("value") or 0.0 for c in cells]
        errors = [c.get("stderr") or 0.0 for c in cells]
        color = (MODE_COLORS.get(column.run.mode) if by_mode else None) or next(others, None)
        offset = (i - (len(table.columns) - 1) / 2) * width
        ax.bar([x + offset for x in positions], values, width, yerr=errors, capsize=1.5, color=color,
               label=column.label, error_kw={"lw": 0.7})
    ax.set_xticks(positions)
    ax.set_xticklabels([r.name for r in rows], rotation=60, ha="right", fontsize=8)
    for label in ax.get_xticklabels()[len(tasks):]:
        label.set_fontweight("bold")
    if groups and tasks:
        ax.axvline(len(tasks) - 0.2, color="black", lw=0.8, ls=":")
    metrics = sorted({r.metric.split(",", 1)[0] for r in rows if r.metric})
    ax.set_ylabel(" / ".join(metrics))
    top = max((c["value"] + (c["stderr"] or 0) for r in rows for c in r.cells.values() if c and c["value"]), default=1)
    if top <= 1:  # scores in [0, 1]: the same scale for every plot
        ax.set_ylim(0, 1.02)
    models = {c.run.model_name for c in table.columns}
    if len(models) == 1:
        ax.set_title(models.pop(), fontsize=9)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.spines[["top", "right"]].set_visible(False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
