"""``taskvec compare``: the subcommand's options (lm_eval's own for running the modes) and its entry point."""

from __future__ import annotations

import argparse

from lm_eval_taskvec.settings import MODES

EXAMPLES = """examples:
  taskvec compare --model_args pretrained=embedded --tasks task_vectors --output_path out/
  taskvec compare out/regular out/hypothesis hf_run/results_2025-01-01T00-00-00.json --output_path merged/
"""


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows every default that is a value (not "None"), and keeps the examples' line breaks."""

    def _get_help_string(self, action):
        return action.help if action.default in (None, False) else super()._get_help_string(action)


def add_chat_options(parser) -> None:
    """lm_eval's --apply_chat_template and --fewshot_as_multiturn, with its names, parsing and defaults."""
    parser.add_argument(
        "--apply_chat_template",
        type=str,
        nargs="?",
        const=True,
        default=False,
        metavar="<template>",
        help="render prompts with the model's chat template (optionally a template's name), as lm_eval does",
    )
    parser.add_argument(
        "--fewshot_as_multiturn",
        type=lambda x: x.lower() in ("true", "1", "yes"),
        nargs="?",
        const=True,
        default=None,
        metavar="<bool>",
        help="demonstrations as user/assistant turns (default: on with --apply_chat_template; false: one user turn)",
    )


def chat_options(args) -> dict:
    """The two options resolved as lm_eval resolves them: multi-turn by default under a chat template, and
    never without one."""
    multiturn = args.fewshot_as_multiturn
    if multiturn and not args.apply_chat_template:
        raise SystemExit("--fewshot_as_multiturn needs --apply_chat_template (as in lm_eval)")
    apply = args.apply_chat_template
    return {"apply_chat_template": apply, "fewshot_as_multiturn": bool(apply) if multiturn is None else multiturn}


def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "compare",
        help="one table of every mode, run and method, with paired tests",
        epilog=EXAMPLES,
        description="Merge lm_eval results files (any model type) into one table, or run hf-taskvec's modes "
        "first (one process, the model loaded once). Writes compare.md/.csv/.json/.png.",
        formatter_class=lambda prog: _Help(prog, max_help_position=32),
    )
    parser.add_argument(
        "results",
        nargs="*",
        metavar="RESULTS",
        help="results_*.json written by lm_eval --output_path, or folders holding them",
    )
    parser.add_argument(
        "--output_path",
        default="taskvec_compare",
        help="folder for compare.* and, when running, <mode>/ results as lm_eval writes them",
    )
    run = parser.add_argument_group("running the modes (give --tasks)")
    run.add_argument(
        "--model_args",
        default=None,
        help="as for lm_eval --model hf-taskvec, without mode (default when --tasks is given: pretrained=embedded)",
    )
    run.add_argument("--tasks", default=None, help="comma-separated tasks or groups")
    run.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of the modes")
    run.add_argument(
        "--methods",
        default=None,
        help="comma-separated hypothesis methods, a column each (hendel, elicit, task_mean, function_vector; "
        "docs/methods.md)",
    )
    run.add_argument("--num_fewshot", type=int, default=None, help="demonstrations per prompt (default: the task's)")
    run.add_argument(
        "--limit",
        type=float,
        default=None,
        help="scored documents per task (count, or fraction if < 1; default: all). It does not "
        "bound layer=auto's sweep, which scores num_dev dev prompts per task (default 50, per "
        "half when cross-fitted): set that with --model_args num_dev=N",
    )
    run.add_argument("--batch_size", default="1", help="as for lm_eval: an integer, or auto (on a CPU: 8)")
    run.add_argument("--device", default=None, help="e.g. cpu, cuda:0 (default: cuda when available, else cpu)")
    run.add_argument("--gen_kwargs", default=None, help="e.g. max_gen_toks=1 (the paper's first-token protocol)")
    run.add_argument("--include_path", default=None, help="a folder of extra task YAMLs")
    run.add_argument(
        "--seed",
        default=None,
        help="lm_eval's seeds: one integer, or python,numpy,torch,fewshot (lm_eval's default 0,1234,1234,1234)",
    )
    run.add_argument(
        "--log_samples",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="write samples files (the paired tests need them)",
    )
    run.add_argument("--verbosity", type=str.upper, default="INFO", help="log level, as for lm_eval")
    add_chat_options(run)
    table = parser.add_argument_group("the table")
    table.add_argument(
        "--pairs",
        default=None,
        help="column pairs to test, 'A:B,C:D' by label or number (default: H vs R and H vs B for "
        "hf-taskvec modes of one model, else every column vs the first)",
    )
    table.add_argument(
        "--metric",
        default=None,
        help="headline metric where a task has it (default: paper_match, else lm-eval's first)",
    )
    table.add_argument("--paired_iters", type=int, default=10_000, help="paired bootstrap resamples")
    table.add_argument("--paired_seed", type=int, default=1234, help="paired bootstrap seed")
    table.add_argument("--no_plot", action="store_true", help="skip compare.png")
    return parser


def compare_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    from lm_eval.utils import setup_logging

    from lm_eval_taskvec.comparison import UsageError, compare, markdown

    setup_logging(args.verbosity)

    running = args.tasks is not None or args.model_args is not None
    options = (
        dict(
            num_fewshot=args.num_fewshot,
            limit=args.limit,
            batch_size=args.batch_size,
            device=args.device,
            gen_kwargs=args.gen_kwargs,
            include_path=args.include_path,
            seed=args.seed,
            log_samples=args.log_samples,
            methods=args.methods,
            **chat_options(args),
        )
        if running
        else {}
    )
    pairs = [tuple(p.split(":", 1)) for p in args.pairs.split(",")] if args.pairs else None
    if pairs and any(len(p) != 2 for p in pairs):
        parser.error(f"--pairs {args.pairs}: write each pair as A:B, pairs separated by commas")
    try:
        table = compare(
            args.results,
            args.output_path,
            model_args=args.model_args,
            tasks=args.tasks,
            modes=args.modes,
            pairs=pairs,
            metric=args.metric,
            paired_iters=args.paired_iters,
            paired_seed=args.paired_seed,
            plot=not args.no_plot,
            **options,
        )
    except UsageError as e:
        parser.error(str(e))
    print(markdown(table))
    print(f"wrote compare.md, compare.csv, compare.json{'' if args.no_plot else ', compare.png'} to {args.output_path}")
