"""``taskvec geometry``: θ of one task lie closer to each other than to other tasks' θ (the paper's Figures 5
and 9, and its variability histogram).

For each task, θ comes from ``num_sets`` demonstration sets (the paper: 50 sets of 4 demonstrations, fresh
dummies each). All θ are compared by cosine distance; per task the table gives the mean distance within the
task and the mean distance to the nearest other task. The PNG shows a 2-D t-SNE (scikit-learn) coloured by
task and histograms of within-task and between-task distances.

With ``--layer auto`` each task's θ is read at its own layer, as the paper did; a fixed ``--layer`` puts every
task in one block's space (different blocks alone can make tasks look apart).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from lm_eval_taskvec.analyses.common import (
    block_of,
    load_tasks,
    open_model,
    require,
    theta_sets,
    write_json,
    write_table,
)
from lm_eval_taskvec.comparison.cli import chat_options
from lm_eval_taskvec.figures import new_figure, palette, save
from lm_eval_taskvec.identity import model_identity

HISTOGRAM_BINS = 40


def main(args) -> dict:
    """``taskvec geometry``, from its parsed command-line options."""
    lm = open_model(args.model_args, args.batch_size, args.device, getattr(args, "method", None))
    return theta_geometry(
        lm,
        load_tasks(args.tasks, args.include_path, lm, chat_options(args)),
        args.output_path,
        layer=args.layer,
        num_sets=args.num_sets,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
    )


def theta_geometry(
    lm, tasks: dict, output_path, layer="auto", num_sets: int = 50, num_fewshot: int = 4, seed: int = 1234
) -> dict:
    """θ for ``num_sets`` demonstration sets per task, their distances, table, t-SNE and histograms; writes
    geometry.{md,csv,json,png} into ``output_path`` and returns every number, θ and the distance matrix too."""
    tsne = require("sklearn.manifold").TSNE  # missing extras fail before the long part
    if len(tasks) < 2:
        raise ValueError(f"--tasks names {len(tasks)} task: geometry compares tasks, name at least two")
    if num_sets < 2:
        raise ValueError(f"--num_sets {num_sets}: within-task distances need at least 2 demonstration sets")
    names = list(tasks)
    layers, parts = {}, []
    for name in tqdm(names, desc="geometry: θ per task"):
        layers[name] = block_of(lm, name, layer)
        parts.append(theta_sets(lm, tasks[name], [layers[name]], num_sets, num_fewshot, seed)[0])
    thetas = torch.cat(parts)
    labels = np.repeat(np.arange(len(names)), num_sets)
    distances = cosine_distances(thetas)
    rows, task_distances = task_table(distances.numpy(), labels, names, layers)

    upper = np.triu_indices(len(labels), k=1)
    same = labels[upper[0]] == labels[upper[1]]
    pairs = distances.numpy()[upper]
    edges = np.linspace(0.0, max(pairs.max(), 1e-9), HISTOGRAM_BINS + 1)
    histogram = {
        "edges": edges.tolist(),
        "within": np.histogram(pairs[same], edges)[0].tolist(),
        "between": np.histogram(pairs[~same], edges)[0].tolist(),
    }
    perplexity = min(30.0, (len(labels) - 1) / 3)
    coords = tsne(n_components=2, perplexity=perplexity, metric="cosine", init="pca", random_state=seed).fit_transform(
        thetas.double().numpy()
    )

    out = Path(output_path)
    table = write_table(rows, out / "geometry")
    separated = sum(row["within_lt_between"] for row in rows)
    summary = {
        "tasks": len(rows),
        "within_lt_between": separated,
        "mean_within": float(pairs[same].mean()),
        "mean_between": float(pairs[~same].mean()),
    }
    result = {
        "settings": {
            "model": model_identity(lm.model, len(lm.blocks)),
            "layer": str(layer),
            "layers": layers,
            "num_sets": num_sets,
            "num_fewshot": num_fewshot,
            "num_dummy": lm.settings.num_dummy,
            "seed": seed,
            "tsne_perplexity": perplexity,
        },
        "summary": summary,
        "table": rows,
        "tasks": names,
        "task_distances": task_distances.tolist(),
        "histogram": histogram,
        "tsne": [{"task": names[i], "x": float(x), "y": float(y)} for i, (x, y) in zip(labels, coords)],
    }
    write_json(result, out / "geometry.json")
    _plot(names, labels, coords, histogram, out / "geometry.png")
    print(
        table + f"\n{separated} of {len(rows)} tasks: mean within-task distance < mean distance to the nearest "
        f"other task\nwrote geometry.md, .csv, .json and .png to {out}"
    )
    return result | {"thetas": thetas, "labels": labels.tolist(), "distances": distances}


def cosine_distances(thetas: torch.Tensor) -> torch.Tensor:
    """1 - cosine similarity between every pair of rows, in float64."""
    unit = torch.nn.functional.normalize(thetas.double(), dim=-1)
    return 1.0 - unit @ unit.T


def task_table(
    distances: np.ndarray, labels: np.ndarray, names: list[str], layers: dict
) -> tuple[list[dict], np.ndarray]:
    """Per task: mean distance between its own θ (pairs of distinct sets), and the mean distance to the θ of
    the nearest other task; also the task-by-task matrix of mean distances (diagonal: within)."""
    members = [np.flatnonzero(labels == t) for t in range(len(names))]
    means = np.array([[distances[np.ix_(a, b)].mean() for b in members] for a in members])
    for t, a in enumerate(members):
        block = distances[np.ix_(a, a)]
        means[t, t] = block[~np.eye(len(a), dtype=bool)].mean()
    rows = []
    for t, name in enumerate(names):
        others = [u for u in range(len(names)) if u != t]
        nearest = min(others, key=lambda u: means[t, u])
        rows.append(
            {
                "task": name,
                "layer": layers[name],
                "num_sets": len(members[t]),
                "within": float(means[t, t]),
                "nearest_task": names[nearest],
                "between": float(means[t, nearest]),
                "within_lt_between": bool(means[t, t] < means[t, nearest]),
            }
        )
    return rows, means


def _plot(names, labels, coords, histogram, path: Path) -> None:
    fig = new_figure(figsize=(14, 5.5))
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.25, 1]})
    colors = palette("tab20")
    for t, name in enumerate(names):
        at = labels == t
        left.scatter(coords[at, 0], coords[at, 1], s=12, color=colors[t % len(colors)], label=name)
    left.set_title("t-SNE of θ, coloured by task")
    left.set_xticks([])
    left.set_yticks([])
    left.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False, markerscale=1.5)
    edges = np.array(histogram["edges"])
    for key, color in (("within", "tab:blue"), ("between", "tab:orange")):
        counts = np.array(histogram[key], dtype=float)
        right.stairs(counts / max(counts.sum(), 1), edges, fill=True, alpha=0.5, color=color, label=f"{key} tasks")
    right.set_xlabel("cosine distance between θ")
    right.set_ylabel("fraction of pairs")
    right.legend(frameon=False)
    fig.tight_layout()
    save(fig, path)
