"""``taskvec``: the layer sweep, the comparison of modes and runs, the paper's analyses of θ, the embedded model.

    taskvec sweep --model_args pretrained=embedded --tasks tv_algorithmic --output_path sweep/
    taskvec compare --model_args pretrained=embedded --tasks task_vectors --output_path out/
    taskvec geometry --tasks task_vectors          # also: conflict, vocab, export
    taskvec embedded-path
"""

from __future__ import annotations

import argparse
import importlib
import json
from pathlib import Path

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
    add_analysis_commands(commands)
    args = parser.parse_args(argv)
    if args.command == "compare":
        compare_cli.run(args, compare)
    elif getattr(args, "analysis", None):
        importlib.import_module(f"lm_eval_taskvec.analyses.{args.analysis}").main(args)
    elif args.command == "embedded-path":
        from lm_eval_taskvec.embedded import embedded_model_path

        print(embedded_model_path())
    else:
        run_sweep(args)


def add_analysis_commands(commands) -> None:
    """The paper's analyses of θ, each run by ``main(args)`` of its module in lm_eval_taskvec.analyses."""

    def command(name: str, help: str, tasks: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help)
        parser.set_defaults(analysis=name)
        parser.add_argument("--model_args", default="pretrained=embedded", help="as for lm_eval --model hf-taskvec")
        if tasks:
            parser.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
        parser.add_argument("--layer", default="auto",
                            help="block of θ: auto (each task's layer=auto choice), an index or a fraction of depth")
        parser.add_argument("--batch_size", default="8")
        parser.add_argument("--device", default=None)
        parser.add_argument("--include_path", default=None)
        parser.add_argument("--output_path", default=f"taskvec_{name}", help="folder for the table, JSON and PNG")
        parser.add_argument("--seed", type=int, default=1234, help="seed for documents and demonstrations")
        return parser

    geometry = command("geometry", "θ of many demonstration sets per task: t-SNE, distances within and between tasks")
    geometry.add_argument("--num_sets", type=int, default=50, help="demonstration sets (θ) per task")
    geometry.add_argument("--num_fewshot", type=int, default=4, help="demonstrations per set (the paper: 4)")
    conflict = command("conflict", "demonstrations of task A with θ of task B patched in", tasks=False)
    conflict.add_argument("--pairs", default=None, help="A:B,... (demonstrations:θ); default: the paper's 5 pairs")
    conflict.add_argument("--num_docs", type=int, default=50, help="queries per pair")
    conflict.add_argument("--num_fewshot", type=int, default=4, help="demonstrations per prompt (the paper: 4)")
    conflict.add_argument("--metric", default="paper_match", help="the tasks' metric in the table and plot")
    for name, help in (("vocab", "mean θ through the final norm and unembedding: top tokens per task"),
                       ("export", "mean θ per task and layer as a safetensors file for theta_path=")):
        parser = command(name, help)
        parser.add_argument("--layers", default=None, help="several blocks, e.g. 15,18,auto (overrides --layer)")
        parser.add_argument("--num_sets", type=int, default=50, help="demonstration sets averaged into θ")
        parser.add_argument("--num_fewshot", type=int, default=None, help="demonstrations per set (default: the task's)")
        if name == "vocab":
            parser.add_argument("--top_k", type=int, default=10, help="tokens listed per task and layer")


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
