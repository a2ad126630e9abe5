"""What the plugin shows of layer choices: the accuracy-by-layer table and the sweep plot."""

from __future__ import annotations

from pathlib import Path

from matplotlib.lines import Line2D

from lm_eval_taskvec.figures import new_figure, save

# Reference lines, drawn when the layer choices carry these dev scores (same documents as the sweep).
REFERENCES = {"baseline_accuracy": ("--", "baseline (query alone)"), "regular_accuracy": (":", "regular ICL")}
# 18 colours for the 18 tasks (tab10 without its grey, which the reference lines use, and 9 more), and markers:
# tasks whose colours are alike differ in marker, and equal curves show both tasks' markers.
TASK_COLORS = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#bcbd22",
    "#17becf",
    "#000075",
    "#800000",
    "#469990",
    "#f032e6",
    "#e6ab02",
    "#66a61e",
    "#6a3d9a",
    "#fb9a99",
    "#a6cee3",
)
TASK_MARKERS = ("o", "s", "^", "D", "v", "P", "X")


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
        cells = [
            f"{choices[n]['dev_accuracy'][layer]:.2f}{'*' if choices[n]['layer'] == layer else ' '}" for n in names
        ]
        rows.append([str(layer), *cells, f"{m:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def no_effect(choice: dict) -> list:
    """Where a choice is flagged ``no_effect`` (no block beats the query alone): [None] for a task chosen as a
    whole, the halves (``scored_fold``) of a cross-fitted task, [] where it is not flagged."""
    if "folds" in choice:
        return [fold.get("scored_fold", i) for i, fold in enumerate(choice["folds"]) if fold.get("no_effect")]
    return [None] if choice.get("no_effect") else []


def task_style(i: int) -> tuple[str, str]:
    """The colour and marker of the i-th task: no two tasks share both (a colour comes back with another marker)."""
    return TASK_COLORS[i % len(TASK_COLORS)], TASK_MARKERS[(i + i // len(TASK_COLORS)) % len(TASK_MARKERS)]


def _label(name: str, choice: dict) -> str:
    flagged = no_effect(choice)
    if not flagged:
        return name
    if flagged == [None] or len(flagged) == len(choice.get("folds", ())):
        return f"{name} (no effect)"
    return f"{name} (no effect in half {', '.join(map(str, flagged))})"


def figure(choices: dict, title: str):
    """The paper's Figure 3: hypothesis-mode dev accuracy by block, a line per task (a colour and marker each,
    the markers staggered so that equal curves still show), each task's chosen block as its marker, large; with
    several tasks their mean in bold (with one task the mean would hide it); baseline and regular ICL dev accuracy
    (mean over tasks) as horizontal reference lines where the choices carry them. A task flagged ``no_effect`` is
    dashed, its chosen block hollow, and its legend entry says so."""
    several = len(choices) > 1
    rows = len(choices) + 8 if several else 4  # legend entries: the styles, a blank, the tasks
    fig = new_figure(
        figsize=(12, max(5.0, 0.19 * rows + 0.6)),  # every legend entry fits
        layout="constrained",
    )  # constrained: room for the legend at right
    ax = fig.subplots()
    task_handles = []
    for i, (name, choice) in enumerate(choices.items()):
        curve, (color, marker) = choice["dev_accuracy"], task_style(i)
        flagged = bool(no_effect(choice))
        (line,) = ax.plot(
            curve,
            lw=1.2 if several else 2.2,
            alpha=0.85 if several else 1.0,
            color=color,
            ls="--" if flagged else "-",
            marker=marker,
            ms=4,
            markevery=(i % 3, 3),
            label=_label(name, choice),
            gid=f"task:{name}",
            zorder=3,
        )
        ax.plot(
            choice["layer"],
            curve[choice["layer"]],
            marker,
            ms=9,
            color=color,  # no effect: hollow
            mec=color if flagged else "black",
            mfc="white" if flagged else color,
            mew=1.8 if flagged else 0.8,
            gid=f"chosen:{name}",
            zorder=4,
        )
        task_handles.append(line)
    one = "--" if not several and no_effect(choice) else "-"
    styles = [
        Line2D(
            [],
            [],
            color="gray",
            lw=1.2 if several else 2.2,
            ls=one,
            marker="o",
            ms=4,
            label="hypothesis, a task (colours and markers at right)"
            if several
            else f"hypothesis, {_label(name, choice)}",
        ),
        Line2D(
            [],
            [],
            color="gray",
            marker="o",
            ms=9,
            mec="black",
            mew=0.8,
            ls="",
            label="chosen block (per task: its marker, large)",
        ),
    ]
    if any(no_effect(choice) for choice in choices.values()):
        styles.append(
            Line2D(
                [],
                [],
                color="gray",
                ls="--",
                marker="o",
                ms=9,
                mfc="white",
                mec="gray",
                mew=1.8,
                label="no effect (not better than the query alone, McNemar)",
            )
        )
    if several:
        mean = mean_curve(choices)
        best = max(range(len(mean)), key=lambda i: (mean[i], -i))
        ax.plot(mean, color="black", lw=2.5, gid="mean", zorder=5)
        ax.axvline(best, color="black", ls="-.", lw=1, gid="best", zorder=1)
        styles += [
            Line2D([], [], color="black", lw=2.5, label=f"hypothesis, mean over {len(choices)} tasks"),
            Line2D([], [], color="black", ls="-.", lw=1, label=f"best block of the mean ({best})"),
        ]
    for key, (style, text) in REFERENCES.items():
        if all(key in choice for choice in choices.values()):
            value = sum(choice[key] for choice in choices.values()) / len(choices)
            ax.axhline(value, color="dimgray", ls=style, lw=1.5, gid=key.removesuffix("_accuracy"), zorder=1)
            styles.append(
                Line2D([], [], color="dimgray", ls=style, lw=1.5, label=text + (", mean over tasks" if several else ""))
            )
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
    save(figure(choices, title), path)
