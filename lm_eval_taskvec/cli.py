"""taskvec: the layer sweep of hf-taskvec as a table and a plot, one table of every mode and run, the paper's
analyses of θ, and the embedded model's folder.

examples:
  taskvec sweep --tasks tv_algorithmic --output_path sweep/
  taskvec sweep --model_args pretrained=HuggingFaceTB/SmolLM2-360M --tasks tv_letter_to_upper --limit 20
  taskvec compare --tasks task_vectors --output_path out/
  taskvec geometry --tasks task_vectors          # also: conflict, vocab, export
  taskvec embedded-path
  taskvec offline-tasks --output_path offline_tasks
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import random
from functools import partial
from pathlib import Path

from lm_eval._cli.utils import MergeDictAction, SplitArgs, _int_or_none_list_arg_type

from lm_eval_taskvec import offline_tasks
from lm_eval_taskvec.comparison import cli as compare_cli

log = logging.getLogger("lm_eval.taskvec")

DEFAULT_SEED = "0,1234,1234,1234"  # lm_eval's: python, numpy, torch, fewshot


class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, examples kept as written; a default of None is described in the help text instead."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, {}) else super()._get_help_string(action)


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """The options of ``lm_eval run`` that a taskvec command running a model takes, with lm_eval's names,
    parsing and defaults (device: CUDA when available, else CPU)."""
    parser.add_argument(
        "--model_args",
        "-a",
        nargs="+",
        action=MergeDictAction,
        default={},
        metavar="<arg>",
        help="hf-taskvec model arguments as key=val,key2=val2 (see README); pretrained defaults to "
        "embedded, the bundled SmolLM2-135M-Instruct",
    )
    parser.add_argument(
        "--tasks",
        "-t",
        nargs="+",
        action=SplitArgs,
        required=True,
        metavar="<task>",
        help="task or group names, space or comma separated",
    )
    parser.add_argument(
        "--num_fewshot",
        "-f",
        type=int,
        default=None,
        metavar="<n>",
        help="demonstrations per prompt (default: each task's own)",
    )
    parser.add_argument(
        "--batch_size", "-b", default="1", metavar="<size>", help="an integer, or auto (on a CPU: 8, see README)"
    )
    parser.add_argument(
        "--max_batch_size",
        type=int,
        default=None,
        metavar="<n>",
        help="upper bound for --batch_size auto (default: lm-eval's 64)",
    )
    parser.add_argument(
        "--device",
        default=None,
        metavar="<device>",
        help="cuda, cuda:1, cpu, mps, ... (default: cuda when available, else cpu)",
    )
    parser.add_argument(
        "--limit", "-L", type=float, default=None, metavar="<n>", help="at most n documents per task (default: all)"
    )
    parser.add_argument(
        "--gen_kwargs",
        nargs="+",
        action=MergeDictAction,
        default=None,
        metavar="<arg>",
        help="generation arguments as key=val, updating the tasks' own",
    )
    parser.add_argument(
        "--seed",
        type=partial(_int_or_none_list_arg_type, 3, 4, DEFAULT_SEED),
        default=DEFAULT_SEED,
        metavar="<python,numpy,torch,fewshot>",
        help="random seeds, one integer for all four or four values (None leaves one unset)",
    )
    parser.add_argument("--include_path", default=None, metavar="<path>", help="additional folder of task YAMLs")
    parser.add_argument(
        "--verbosity",
        "-v",
        type=str.upper,
        default="INFO",
        metavar="<level>",
        help="log level: DEBUG, INFO, WARNING, ERROR",
    )
    parser.add_argument(
        "--output_path", "-o", default="taskvec_sweep", metavar="<path>", help="folder for the command's JSON and plot"
    )
    compare_cli.add_chat_options(parser)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="taskvec", description=__doc__, formatter_class=_Formatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    sweep = commands.add_parser(
        "sweep",
        formatter_class=_Formatter,
        help="hypothesis-mode dev accuracy at every block, per task",
        description="Hypothesis-mode accuracy at every block on each task's dev prompts (documents that are never\n"
        "scored), which layer=auto chooses from: prints a table, writes sweep.json and sweep.png under\n"
        "--output_path.",
    )
    add_run_options(sweep)
    sweep.add_argument(
        "--layer_cache",
        choices=["on", "refresh", "off"],
        default="on",
        help="on: reuse a cached choice and cache new ones; refresh: sweep again and overwrite; "
        "off: neither read nor write the cache",
    )
    _describe(
        sweep, "limit", "n dev prompts per task, per half when cross-fitted (the model argument num_dev; default: 50)"
    )
    _describe(
        sweep,
        "gen_kwargs",
        "as for lm_eval; the sweep scores a generation task by its first token only, so they do not change its numbers",
    )
    commands.add_parser(
        "embedded-path",
        formatter_class=_Formatter,
        help="fetch and convert the embedded SmolLM2 model once, print its folder",
        description="Fetch and convert the embedded SmolLM2-135M-Instruct once; print its folder.",
    )
    compare = compare_cli.add_parser(commands)
    add_analysis_commands(commands)
    offline = offline_tasks.add_parser(commands)
    args = parser.parse_args(argv)
    if args.command == "offline-tasks":
        offline_tasks.write_from_args(args, offline)
    elif args.command == "compare":
        compare_cli.compare_from_args(args, compare)
    elif getattr(args, "analysis", None):
        from lm_eval.utils import setup_logging

        setup_logging(args.verbosity)
        importlib.import_module(f"lm_eval_taskvec.analyses.{args.analysis}").main(args)
    elif args.command == "embedded-path":
        from lm_eval_taskvec.embedded import embedded_model_path

        print(embedded_model_path())
    else:
        run_sweep(args)


def _describe(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """What a shared option means for this command."""
    next(a for a in parser._actions if a.dest == dest).help = text


def add_analysis_commands(commands) -> None:
    """The paper's analyses of θ, each run by ``main(args)`` of its module in lm_eval_taskvec.analyses."""

    def command(name: str, help: str, tasks: bool = True) -> argparse.ArgumentParser:
        parser = commands.add_parser(name, help=help, formatter_class=_Formatter)
        parser.set_defaults(analysis=name)
        parser.add_argument("--model_args", default="pretrained=embedded", help="as for lm_eval --model hf-taskvec")
        if tasks:
            parser.add_argument("--tasks", required=True, help="comma-separated tasks or groups")
        parser.add_argument(
            "--layer",
            default="auto",
            help="block of θ: auto (each task's layer=auto choice), an index or a fraction of depth",
        )
        parser.add_argument("--batch_size", default="1", help="as for lm_eval: an integer, or auto (on a CPU: 8)")
        parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available, else cpu)")
        parser.add_argument("--verbosity", type=str.upper, default="INFO", help="log level, as for lm_eval")
        parser.add_argument("--include_path", default=None)
        parser.add_argument("--output_path", default=f"taskvec_{name}", help="folder for the table, JSON and PNG")
        parser.add_argument("--seed", type=int, default=1234, help="seed for documents and demonstrations")
        parser.add_argument(
            "--method",
            default=None,
            help="hypothesis method whose layer=auto choice --layer auto reads (hendel, elicit, task_mean, "
            "function_vector; export: also what it writes and how theta_path= applies it). Default: --model_args' "
            "method, else hendel",
        )
        compare_cli.add_chat_options(parser)
        return parser

    geometry = command("geometry", "θ of many demonstration sets per task: t-SNE, distances within and between tasks")
    geometry.add_argument("--num_sets", type=int, default=50, help="demonstration sets (θ) per task")
    geometry.add_argument("--num_fewshot", type=int, default=4, help="demonstrations per set (the paper: 4)")
    conflict = command("conflict", "demonstrations of task A with θ of task B patched in", tasks=False)
    conflict.add_argument("--pairs", default=None, help="A:B,... (demonstrations:θ); default: the paper's 5 pairs")
    conflict.add_argument("--num_docs", type=int, default=50, help="queries per pair")
    conflict.add_argument("--num_fewshot", type=int, default=4, help="demonstrations per prompt (the paper: 4)")
    conflict.add_argument("--metric", default="paper_match", help="the tasks' metric in the table and plot")
    for name, help in (
        ("vocab", "mean θ through the final norm and unembedding: top tokens per task"),
        ("export", "mean θ per task and layer as a safetensors file for theta_path="),
    ):
        parser = command(name, help)
        parser.add_argument("--layers", default=None, help="several blocks, e.g. 15,18,auto (overrides --layer)")
        parser.add_argument("--num_sets", type=int, default=50, help="demonstration sets averaged into θ")
        parser.add_argument(
            "--num_fewshot", type=int, default=None, help="demonstrations per set (default: the task's)"
        )
        if name == "vocab":
            parser.add_argument("--top_k", type=int, default=10, help="tokens listed per task and layer")


def load_model(args, **fixed):
    """hf-taskvec from --model_args plus ``fixed`` model arguments, which the command itself decides."""
    from lm_eval.utils import setup_logging

    import lm_eval_taskvec  # noqa: F401  (registers the task folder even when the start-up hook is off)
    from lm_eval_taskvec.model import TaskVectorLM

    setup_logging(args.verbosity)
    if clash := sorted(set(args.model_args) & set(fixed)):
        raise SystemExit(f"taskvec {args.command} sets {', '.join(clash)} itself: remove it from --model_args")
    _seed(args.seed)
    if args.max_batch_size is not None:
        fixed["max_batch_size"] = args.max_batch_size
    return TaskVectorLM(batch_size=args.batch_size, device=args.device, **args.model_args, **fixed)


def load_tasks(args, lm) -> dict:
    """The tasks as lm_eval would run them: --num_fewshot, --gen_kwargs, the few-shot seed and the chat
    options (rendered by ``lm``'s template) applied."""
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec._autoload import record_prompt_settings

    tasks = TaskManager(include_path=args.include_path).load(args.tasks)["tasks"]
    chat = compare_cli.chat_options(args)
    for task in tasks.values():
        if chat["apply_chat_template"]:
            record_prompt_settings(task, chat | {"apply_chat_template": True}, lm.apply_chat_template)
        if args.gen_kwargs and task.get_config("output_type") == "generate_until":
            task.set_config(key="generation_kwargs", value=args.gen_kwargs, update=True)
        if args.num_fewshot is not None and task.get_config("num_fewshot") != 0:
            task.set_config(key="num_fewshot", value=args.num_fewshot)
        task.set_fewshot_seed(seed=args.seed[3])
    return tasks


def _seed(seeds: list[int | None]) -> None:
    import numpy as np
    from lm_eval.utils import set_torch_seed

    python, numpy, torch, _ = seeds
    if python is not None:
        random.seed(python)
    if numpy is not None:
        np.random.seed(numpy)
    if torch is not None:
        set_torch_seed(torch)


def run_sweep(args) -> None:
    from lm_eval_taskvec.figures import span
    from lm_eval_taskvec.sweep_report import format_table, plot

    fixed = {"mode": "hypothesis", "layer": "auto", "layer_cache": args.layer_cache}
    if args.limit is not None:
        if args.limit < 2 or not float(args.limit).is_integer():
            raise SystemExit(f"--limit {args.limit:g}: taskvec sweep counts dev prompts, give an integer >= 2")
        fixed["num_dev"] = int(args.limit)
    lm = load_model(args, **fixed)
    tasks = load_tasks(args, lm)
    lm.choose_layers(tasks)
    choices = {name: lm.layer_choices[name] for name in sorted(tasks)}

    out = Path(args.output_path)
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep.json").write_text(json.dumps(choices, indent=1))
    print(format_table(choices))
    model = f"{lm.embedded['model']} (embedded, {lm.embedded['weights']})" if lm.embedded else lm.model.name_or_path
    shots = span([task.get_config("num_fewshot") or 0 for task in tasks.values()])
    title = (
        f"{model}\n{', '.join(args.tasks)}: n = {span([c['num_dev'] for c in choices.values()])} dev "
        f"prompts per task, {shots}-shot, {lm.settings.num_dummy} dummy queries per θ"
    )
    plot(choices, out / "sweep.png", title)
    print(f"\nwrote {out / 'sweep.json'} and {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
