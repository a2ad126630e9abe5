#!/usr/bin/env python
"""Dev accuracy of hypothesis mode by block for several `taskvec sweep` runs in one figure: a panel per group
of the 18 tasks (and all of them), a line per run, the runs' baseline and regular ICL as thin reference lines.

    python scripts/layer_curves.py plain=sweep_plain/sweep.json chat=sweep_chat/sweep.json --output curves.png

A group's curve is the mean over its tasks of each task's dev accuracy at that block (the tasks' own dev
prompts, as `layer=auto` scores them); a cross-fitted task counts with its two halves pooled.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import yaml

from lm_eval_taskvec.figures import new_figure, palette, save
from lm_eval_taskvec.tasks import task_dir

GROUPS = ("tv_algorithmic", "tv_translation", "tv_linguistic", "tv_knowledge")


def group_members() -> dict[str, list[str]]:
    """Each group's tasks, read from its YAML in the package."""
    return {g: yaml.safe_load((task_dir() / f"{g}.yaml").read_text())["task"] for g in GROUPS}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="LABEL=SWEEP_JSON", help="a label and a sweep.json per run")
    parser.add_argument("--output", default="layer_curves.png")
    args = parser.parse_args()
    runs = {}
    for given in args.runs:
        label, sep, path = given.partition("=")
        if not sep:
            parser.error(f"{given!r}: give LABEL=path/to/sweep.json")
        runs[label] = json.loads(Path(path).read_text())
    members = group_members() | {"all": [t for g in GROUPS for t in group_members()[g]]}
    fig = new_figure(figsize=(4 * len(members), 3.6))
    axes = fig.subplots(1, len(members), sharey=True)
    for ax, (group, tasks) in zip(axes, members.items()):
        for (label, sweep), colour in zip(runs.items(), palette("tab10")):
            missing = [t for t in tasks if t not in sweep]
            if missing:
                raise SystemExit(f"run {label!r} has no sweep of {', '.join(missing)}")
            curve = np.mean([sweep[t]["dev_accuracy"] for t in tasks], axis=0)
            ax.plot(range(len(curve)), curve, color=colour, marker="o", markersize=3, label=f"{label}: hypothesis")
            for key, style, name in (("baseline_accuracy", "--", "baseline"), ("regular_accuracy", ":", "regular")):
                level = np.mean([sweep[t][key] for t in tasks])
                ax.axhline(level, color=colour, linestyle=style, linewidth=1, label=f"{label}: {name}")
        ax.set_title(f"{group.removeprefix('tv_')} ({len(tasks)} tasks)", fontsize=10)
        ax.set_xlabel("block (0-based)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("dev accuracy")
    axes[-1].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    save(fig, Path(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
