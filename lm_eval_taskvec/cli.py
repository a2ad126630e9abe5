"""``taskvec``: the layer sweep as a table and a plot, the comparison of modes and runs, and the embedded model's path.

    taskvec sweep --model_args pretrained=embedded --tasks tv_algorithmic --output_path sweep/
    taskvec compare --model_args pretrained=embedded --tasks task_vectors --output_path out/
    taskvec embedded-path
    taskvec offline-tasks --output_path offline_tasks
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm_eval_taskvec import offline_tasks
from lm_eval_taskvec.comparison import cli as compare_cli


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskvec", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    sweep = commands.add_parser("sweep", help="hypothesis-mode dev accuracy at every block, per task")
    sweep.add_argument("--model_args", default="pretrained=embedded", help="as for lm_eval --model hf-taskvec")
    sweep.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
    sweep.add_argument("--num_fewshot", type=int, default=None)
    sweep.add_argument("--include_path", default=None)
    sweep.add_argument("--device", default=None)
    sweep.add_argument("--batch_size", default="8")
    sweep.add_argument("--output_path", default="taskvec_sweep", help="folder for sweep.json and sweep.png")
    sweep.add_argument("--no_cache", action="store_true", help="sweep again even if a choice is cached")
    commands.add_parser("embedded-path", help="convert the embedded SmolLM2 model once and print its folder")
    compare = compare_cli.add_parser(commands)
    offline = offline_tasks.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "offline-tasks":
        return offline_tasks.run(args, offline)
    if args.command == "compare":
        compare_cli.run(args, compare)
    elif args.command == "embedded-path":
        from lm_eval_taskvec.embedded import embedded_model_path

        print(embedded_model_path())
    else:
        run_sweep(args)


def run_sweep(args) -> None:
    import lm_eval_taskvec  # noqa: F401  (registers the task folder even when the start-up hook is off)
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.selection import select_layer

    model_args = simple_parse_args_string(args.model_args) | {"mode": "hypothesis", "layer": "auto"}
    if args.no_cache:
        model_args["layer_cache"] = False
    extra = {"device": args.device} if args.device else {}
    lm = TaskVectorLM(batch_size=args.batch_size, **extra, **model_args)
    tasks = TaskManager(include_path=args.include_path).load(args.tasks.split(","))["tasks"]
    if args.num_fewshot is not None:
        for task in tasks.values():
            task.set_config(key="num_fewshot", value=args.num_fewshot)
    choices = {name: select_layer(lm, name) for name in sorted(tasks)}

    out = Path(args.output_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(choices, indent=1))
    print(format_table(choices))
    plot(choices, out / "sweep.png")
    print(f"\nwrote {out / 'sweep.json'} and {out / 'sweep.png'}")


def mean_curve(choices: dict) -> list[float]:
    curves = [c["dev_accuracy"] for c in choices.values()]
    return [sum(values) / len(values) for values in zip(*curves)]


def format_table(choices: dict) -> str:
    """Accuracy by layer, one column per task and the mean; ``*`` marks each task's chosen layer."""
    names = list(choices)
    mean = mean_curve(choices)
    header = ["layer", *names, "mean"]
    rows = []
    for layer, m in enumerate(mean):
        cells = [f"{choices[n]['dev_accuracy'][layer]:.2f}{'*' if choices[n]['layer'] == layer else ' '}" for n in names]
        rows.append([str(layer), *cells, f"{m:.2f}"])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    lines = [" | ".join(h.rjust(w) for h, w in zip(header, widths)), "-+-".join("-" * w for w in widths)]
    lines += [" | ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    return "\n".join(lines)


def plot(choices: dict, path: Path) -> None:
    """The paper's Figure 3: dev accuracy by layer, a line per task, the mean in bold, chosen layers marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    colors = plt.get_cmap("tab20").colors
    for i, (name, choice) in enumerate(choices.items()):
        curve = choice["dev_accuracy"]
        (line,) = ax.plot(curve, lw=1, alpha=0.7, label=name, color=colors[i % len(colors)])
        ax.plot(choice["layer"], curve[choice["layer"]], "o", color=line.get_color())
    mean = mean_curve(choices)
    best = max(range(len(mean)), key=lambda i: (mean[i], -i))
    ax.plot(mean, color="black", lw=2.5, label="mean")
    ax.axvline(best, color="black", ls="--", lw=1)
    ax.set_xlabel("layer (decoder block)")
    ax.set_ylabel("dev accuracy (hypothesis)")
    ax.set_ylim(-0.02, 1.02)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
