"""``taskvec conflict``: does θ of task B override demonstrations of task A? (the paper's Table 2, Figure 6)

For a pair A:B, queries valid for both tasks get task-A demonstrations (the full regular prompt of A); the
patched run replaces block L's output at the prompt's last token by θ of task B (θ from B's own
demonstrations of the same query, at B's layer). Both runs are scored against A's answers and against B's,
by each task's own ``process_results`` on the generation, averaged over documents (the tasks' lm-eval filters
are not applied: the tv_* tasks have none).
"""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path

from tqdm import tqdm

from lm_eval_taskvec.analyses.common import block_of, load_tasks, open_model, write_json, write_table
from lm_eval_taskvec.comparison.cli import chat_options
from lm_eval_taskvec.contexts import rendered_queries
from lm_eval_taskvec.figures import new_figure, save
from lm_eval_taskvec.identity import model_identity
from lm_eval_taskvec.planning import Plan
from lm_eval_taskvec.theta import few_shot_requests

# The paper's pairs, A (demonstrations) : B (θ), as the tv_* tasks
PAPER_PAIRS = (
    ("tv_next_letter", "tv_letter_to_upper"),
    ("tv_list_last", "tv_list_first"),
    ("tv_prev_letter", "tv_next_letter"),
    ("tv_present_past", "tv_present_gerund"),
    ("tv_en_es", "tv_en_fr"),
)
RUNS = ("regular", "patched")


def main(args) -> dict:
    """``taskvec conflict``, from its parsed command-line options."""
    pairs = parse_pairs(args.pairs) if args.pairs else list(PAPER_PAIRS)
    lm = open_model(args.model_args, args.batch_size, args.device, getattr(args, "method", None))
    tasks = load_tasks(sorted({name for pair in pairs for name in pair}), args.include_path, lm, chat_options(args))
    return conflicting_tasks(
        lm,
        tasks,
        pairs,
        args.output_path,
        layer=args.layer,
        num_docs=args.num_docs,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
        metric=args.metric,
    )


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """``A:B,C:D`` into [(A, B), (C, D)]: demonstrations of A, θ of B."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        a, colon, b = item.partition(":")
        if not colon or not a.strip() or not b.strip() or ":" in b:
            raise ValueError(
                f"--pairs {item!r}: write each pair as DEMONSTRATIONS_TASK:THETA_TASK, e.g. "
                "tv_next_letter:tv_letter_to_upper"
            )
        pairs.append((a.strip(), b.strip()))
    if not pairs:
        raise ValueError("--pairs is empty: e.g. --pairs tv_next_letter:tv_letter_to_upper")
    return pairs


def conflicting_tasks(
    lm,
    tasks: dict,
    pairs,
    output_path,
    layer="auto",
    num_docs: int = 50,
    num_fewshot: int = 4,
    seed: int = 1234,
    metric: str = "paper_match",
) -> dict:
    """Regular and θ-of-B-patched runs of A's prompts for each pair, scored against both tasks; writes
    conflict.{md,csv,json,png} into ``output_path`` and returns every number and generation."""
    for a, b in pairs:
        for name in (a, b):
            _check_task(tasks, name, metric)
    shared = {(a, b): shared_documents(tasks[a], tasks[b], num_docs, seed) for a, b in pairs}  # refuse early
    rows, details = [], []
    for a, b in tqdm(pairs, desc="conflict: pairs"):
        docs = shared[(a, b)]
        block = block_of(lm, b, layer)
        requests_a = [r[0] for r in few_shot_requests(tasks[a], [d[0] for d in docs], num_fewshot, seed)]
        requests_b = [r[0] for r in few_shot_requests(tasks[b], [d[1] for d in docs], num_fewshot, seed)]
        outputs = generations(lm, requests_a, lm.plan(requests_b, layer=block))
        scores = {
            run: {
                "A": accuracy(tasks[a], [d[0][1] for d in docs], outputs[run]),
                "B": accuracy(tasks[b], [d[1][1] for d in docs], outputs[run]),
            }
            for run in RUNS
        }
        rows.append(
            {
                "task_A": a,
                "task_B": b,
                "layer": block,
                "num_docs": len(docs),
                **{f"{run}_acc_{side}": scores[run][side][metric] for run in RUNS for side in "AB"},
            }
        )
        details.append(
            {
                "task_A": a,
                "task_B": b,
                "layer": block,
                "scores": scores,
                "documents": [
                    {
                        "context": req.args[0],
                        "target_A": tasks[a].doc_to_target(da),
                        "target_B": tasks[b].doc_to_target(db),
                        "regular": regular,
                        "patched": patched,
                    }
                    for req, ((_, da), (_, db)), regular, patched in zip(
                        requests_a, docs, outputs["regular"], outputs["patched"]
                    )
                ],
            }
        )

    out = Path(output_path)
    table = write_table(rows, out / "conflict")
    result = {
        "settings": {
            "model": model_identity(lm.model, len(lm.blocks)),
            "layer": str(layer),
            "metric": metric,
            "num_docs": num_docs,
            "num_fewshot": num_fewshot,
            "num_dummy": lm.settings.num_dummy,
            "seed": seed,
        },
        "table": rows,
        "pairs": details,
    }
    write_json(result, out / "conflict.json")
    _plot(rows, metric, out / "conflict.png")
    print(
        f"{metric}; A = the demonstrations' task, B = the task whose θ is patched in\n{table}"
        f"wrote conflict.md, .csv, .json and .png to {out}"
    )
    return result


def _check_task(tasks: dict, name: str, metric: str) -> None:
    if name not in tasks:
        raise ValueError(f"--pairs names {name!r}, which is not among the loaded tasks {sorted(tasks)}")
    task = tasks[name]
    if task.get_config("output_type") != "generate_until":
        raise ValueError(
            f"--pairs: {name!r} is a {task.get_config('output_type')} task; conflicting tasks compare "
            "generated answers against both tasks, so both must be generate_until tasks"
        )
    metrics = [m["metric"] for m in task.config.metric_list or []]
    if metric not in metrics:
        raise ValueError(f"--metric {metric!r}: task {name!r} reports {metrics}; pass one of them")


def shared_documents(task_a, task_b, num_docs: int, seed: int) -> list[tuple[tuple[int, dict], tuple[int, dict]]]:
    """Up to ``num_docs`` evaluated documents of A (drawn with ``seed``) whose query B renders too, each paired
    with that document of B (from any of B's splits): ((doc_id, doc) of A, (doc_id, doc) of B)."""
    of_b = {}
    for has, docs in (
        (task_b.has_test_docs, task_b.test_docs),
        (task_b.has_validation_docs, task_b.validation_docs),
        (task_b.has_training_docs, task_b.training_docs),
    ):
        for i, doc in enumerate(docs() if has() else []):
            of_b.setdefault(rendered_queries(task_b, doc)[0], (i, doc))
    docs_a = list(enumerate(task_a.eval_docs))
    shared = [(pair, of_b[query]) for pair in docs_a if (query := rendered_queries(task_a, pair[1])[0]) in of_b]
    if not shared:
        example_a, example_b = rendered_queries(task_a, docs_a[0][1])[0], next(iter(of_b), "")
        raise ValueError(
            f"--pairs {task_a.config.task}:{task_b.config.task}: no query of {task_a.config.task} is also a query of "
            f"{task_b.config.task} (e.g. {example_a!r} and {example_b!r}), so no answer can tell which task the model "
            "did: pair tasks over the same inputs"
        )
    return random.Random(seed).sample(shared, min(num_docs, len(shared)))


def generations(lm, requests_a: list, theta_plans: list) -> dict[str, list[str]]:
    """Generations for A's full prompts: as they are (``regular``), and with each plan's θ patched at the
    prompt's last token at the plan's layer (``patched``)."""
    full = [request.args[0] for request in requests_a]
    return {
        "regular": lm.generate_planned(requests_a, [Plan(text) for text in full]),
        "patched": lm.generate_planned(
            requests_a, [replace(plan, query=text) for plan, text in zip(theta_plans, full)]
        ),
    }


def accuracy(task, docs: list[dict], outputs: list[str]) -> dict[str, float]:
    """Mean of every metric the task's own ``process_results`` gives these generations."""
    scores = [task.process_results(doc, [output]) for doc, output in zip(docs, outputs)]
    return {name: sum(float(s[name]) for s in scores) / len(scores) for name in scores[0]}


def _plot(rows: list[dict], metric: str, path: Path) -> None:
    """Grouped bars, as the paper's Figure 6: per pair, regular and patched accuracy w.r.t. A and B."""
    fig = new_figure(figsize=(max(6.0, 1.8 * len(rows) + 2), 4.2))
    ax = fig.subplots()
    bars = [
        ("regular_acc_A", "regular, w.r.t. A", "tab:blue", None),
        ("regular_acc_B", "regular, w.r.t. B", "tab:orange", None),
        ("patched_acc_A", "θ of B patched, w.r.t. A", "tab:blue", "//"),
        ("patched_acc_B", "θ of B patched, w.r.t. B", "tab:orange", "//"),
    ]
    width = 0.8 / len(bars)
    for i, (key, label, color, hatch) in enumerate(bars):
        xs = [p + (i - (len(bars) - 1) / 2) * width for p in range(len(rows))]
        ax.bar(
            xs,
            [row[key] for row in rows],
            width,
            label=label,
            color=color,
            hatch=hatch,
            alpha=0.55 if hatch is None else 0.95,
            edgecolor="white",
        )
    ticks = [f"{_short(r['task_A'])}\n← {_short(r['task_B'])}\nblock {r['layer']}" for r in rows]
    ax.set_xticks(range(len(rows)), ticks, fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    save(fig, path)


def _short(name: str) -> str:
    return name.removeprefix("tv_")
