"""What the plugin shows of layer choices: the accuracy-by-layer table and the sweep plot."""

from __future__ import annotations

from pathlib import Path

# Reference lines, drawn when the layer choices carry these dev scores (same documents as the sweep).
REFERENCES = {"baseline_accuracy": ("--", "baseline (query alone)"), "regular_accuracy": (":", "regular ICL")}


def mean_curve(choices: dict) -> list[float]:
    curves = [c["dev_accuracy"] for c in choices.values()]
    return [sum(values) / len(values) for values in zip(*curves)]


def format_table(choices: dict) -> str:
    """Accuracy by block, one column per task and the mean; ``*`` marks each task's chosen block."""
    names = list(choices)
    mean = mean_curve(choices)
    header = ["block", *names, "mean"]
    rows = []
    for layer, m in enumerate(mean):
        cells = [f"{choices[n]['dev_accuracy'][layer]:.2f}{'*' if choices[n]['layer'] == layer else ' '}" for n in names]
        rows.append([str(layer), *cells, f"{m:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def span(values) -> str:
    """"50" when all values agree, "26–50" otherwise."""
    low, high = min(values), max(values)
    return str(low) if low == high else f"{low}–{high}"


def figure(choices: dict, title: str):
    """The paper's Figure 3: hypothesis-mode dev accuracy by block, a line per task, each task's chosen block as a
    dot; with several tasks their mean in bold (with one task the mean would hide it); baseline and regular ICL
    dev accuracy (mean over tasks) as horizontal reference lines where the choices carry them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    several = len(choices) > 1
    fig, ax = plt.subplots(figsize=(12, 5), layout="constrained")  # constrained: room for the legends at right
    colors = plt.get_cmap("tab20").colors
    task_handles = []
    for i, (name, choice) in enumerate(choices.items()):
        curve, color = choice["dev_accuracy"], colors[i % len(colors)]
        (line,) = ax.plot(curve, lw=1.2 if several else 2.2, alpha=0.8 if several else 1.0, color=color,
                          label=name, gid=f"task:{name}", zorder=3)
        ax.plot(choice["layer"], curve[choice["layer"]], "o", color=color, gid=f"chosen:{name}", zorder=4)
        task_handles.append(line)
    styles = [Line2D([], [], color="gray", lw=1.2 if several else 2.2,
                     label="hypothesis, a task (colours at right)" if several else f"hypothesis, {name}"),
              Line2D([], [], color="gray", marker="o", ls="", label="chosen block (per task)")]
    if several:
        mean = mean_curve(choices)
        best = max(range(len(mean)), key=lambda i: (mean[i], -i))
        ax.plot(mean, color="black", lw=2.5, gid="mean", zorder=5)
        ax.axvline(best, color="black", ls="-.", lw=1, gid="best", zorder=1)
        styles += [Line2D([], [], color="black", lw=2.5, label=f"hypothesis, mean over {len(choices)} tasks"),
                   Line2D([], [], color="black", ls="-.", lw=1, label=f"best block of the mean ({best})")]
    for key, (style, text) in REFERENCES.items():
        if all(key in choice for choice in choices.values()):
            value = sum(choice[key] for choice in choices.values()) / len(choices)
            ax.axhline(value, color="dimgray", ls=style, lw=1.5, gid=key.removesuffix("_accuracy"), zorder=1)
            styles.append(Line2D([], [], color="dimgray", ls=style, lw=1.5,
                                 label=text + (", mean over tasks" if several else "")))
    depth = len(next(iter(choices.values()))["dev_accuracy"])
    ax.set_xlabel(f"block L (0-based) of {depth}: where θ is read and patched")
    ax.set_ylabel("dev accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title, fontsize=10)
    blank = Line2D([], [], ls="", label=" ")
    handles = styles + ([blank, *task_handles] if several else [])  # one legend: line styles, then task colours
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    return fig


def plot(choices: dict, path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    fig = figure(choices, title)
    fig.savefig(path, dpi=120)
    plt.close(fig)
