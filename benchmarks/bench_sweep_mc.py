"""layer=auto on a multiple-choice task: a full sweep against one hypothesis evaluation of the same dev prompts.

    python benchmarks/bench_sweep_mc.py [--task arc_easy_offline] [--num_fewshot 5] [--num_dev 50] [--threads 1]

Issue 9's target: the sweep costs <= 3x ``loglikelihood`` of the same dev requests in hypothesis mode at one
fixed layer, θ extracted afresh. The sweep runs S once for θ at every block and regular's scores, then the
queries once into a shared KV cache, from which baseline and each block are scored (blocks below the patch
replayed). One process, one model, the two cases interleaved (best of ``--repeats``); times are this
process's CPU time, which other processes on a shared machine barely change (wall time is printed beside
it). ``--flops`` first counts the floating-point operations of each case (torch's FlopCounterMode, untimed):
the ratio that no implementation detail changes. The forward passes of each case, and how often block 0 ran
in them, are printed too (tests/test_selection.py only bounds them). ``--profile`` adds a cProfile of one sweep.
Needs the offline tasks (``taskvec offline-tasks``); the default folder is built on first use.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections import defaultdict
from contextlib import contextmanager


@contextmanager
def timed_calls(owner, name: str, totals: dict):
    """Add the CPU time of every call of ``owner.name`` to ``totals[name]``."""
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        start = time.process_time()
        try:
            return original(*args, **kwargs)
        finally:
            totals[name] += time.process_time() - start

    setattr(owner, name, wrapper)
    try:
        yield
    finally:
        setattr(owner, name, original)


@contextmanager
def counted_passes(model, first_block, counts: dict):
    """Count ``model``'s forward passes and the runs of ``first_block`` (of a part with weights: a block the
    sweep replays from a recorded pass calls its hooks but runs none of its parts) into ``counts``."""
    part = next(m for m in first_block.modules() if list(m.parameters(recurse=False)))

    def add(key):
        return lambda *_: counts.__setitem__(key, counts.get(key, 0) + 1)

    handles = [model.register_forward_pre_hook(add("passes")), part.register_forward_pre_hook(add("block 0"))]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="arc_easy_offline")
    parser.add_argument(
        "--include_path", default=None, help="folder of offline task YAMLs (default: built in the cache)"
    )
    parser.add_argument("--num_fewshot", type=int, default=5)
    parser.add_argument("--num_dev", type=int, default=50)
    parser.add_argument("--layer", type=int, default=20, help="the fixed layer of the hypothesis evaluation")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds (0: only --flops)")
    parser.add_argument("--pretrained", default="embedded")
    parser.add_argument("--flops", action="store_true", help="first count each case's floating-point operations")
    parser.add_argument(
        "--profile", action="store_true", help="then print a cProfile of one sweep and one hypothesis evaluation"
    )
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

    import torch

    torch.set_num_threads(args.threads)
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_taskvec import offline_tasks
    from lm_eval_taskvec.embedded import EMBEDDED_NAME, cache_dir, embedded_model_path
    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.selection import dev_sets, sweep

    include = args.include_path or str(cache_dir() / "offline_tasks")
    if args.include_path is None:
        offline_tasks.build(include)
    path = embedded_model_path() if args.pretrained == EMBEDDED_NAME else args.pretrained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    common = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size)
    task = TaskManager(include_path=include, include_defaults=False).load([args.task])["tasks"][args.task]
    task.set_config(key="num_fewshot", value=args.num_fewshot)
    sweeper = TaskVectorLM(mode="hypothesis", layer="auto", num_dev=args.num_dev, layer_cache="off", **common)
    fixed = TaskVectorLM(mode="hypothesis", layer=args.layer, **common)
    sets = dev_sets(sweeper.settings, args.task)  # two halves when the task cross-fits (ARC here)
    requests = [r for dev in sets for ex in dev.examples for r in ex.requests]

    def full_sweep():
        sweeper.thetas.clear()
        return sweep.score(sweeper, args.task, sets)

    def hypothesis():
        fixed.thetas.clear()
        return fixed.loglikelihood(requests, disable_tqdm=True)

    cases = {"sweep": (full_sweep, sweeper), "hypothesis": (hypothesis, fixed)}
    if args.flops:
        from torch.utils.flop_counter import FlopCounterMode

        flops = {}
        for name, (case, _) in cases.items():
            with FlopCounterMode(display=False) as counter:
                case()
            flops[name] = counter.get_total_flops()
        print(
            f"floating-point operations: sweep {flops['sweep'] / 1e12:.2f} T, hypothesis "
            f"{flops['hypothesis'] / 1e12:.2f} T, ratio {flops['sweep'] / flops['hypothesis']:.2f}"
        )
    if args.repeats == 0:
        return
    fixed.loglikelihood(requests[:8], disable_tqdm=True)  # warm-up
    best, wall, parts, outputs = defaultdict(lambda: float("inf")), defaultdict(lambda: float("inf")), {}, {}
    passes = {}  # forward passes and runs of block 0 per case (the same in every round)
    for _ in range(args.repeats):
        for name, (case, lm) in cases.items():
            totals = defaultdict(float)
            passes[name] = {}
            with (
                timed_calls(lm.thetas, "ensure", totals),
                timed_calls(sweep, "regular_and_thetas", totals),
                timed_calls(sweep, "fork_scores", totals),
                counted_passes(lm.model, lm.blocks[0], passes[name]),
            ):
                start, start_wall = time.process_time(), time.perf_counter()
                outputs[name] = case()
                seconds, wall[name] = time.process_time() - start, min(wall[name], time.perf_counter() - start_wall)
            if seconds < best[name]:
                best[name], parts[name] = seconds, dict(totals)

    prompts = sum(len(dev.examples) for dev in sets)
    plans = sweeper.planner.plan(requests)
    pairs = [sweeper.encode_pair(p.query, r.args[1]) for p, r in zip(plans, requests)]
    fulls = {tuple(sweeper.encode_pair(*r.args)[0]) for r in requests}
    thetas = {p.theta_key for p in plans}
    query, cont = (sum(len(pair[i]) for pair in pairs) for i in (0, 1))
    n = len(fixed.blocks)
    print(
        f"\ntokens through the model (one block-pass of one token = 1/{n}):\n"
        f"  θ prompts [S, x']: {sum(map(len, (t for k in thetas for t in sweeper.thetas.prompts(k))))} "
        f"(hypothesis to block {args.layer}, sweep through all {n})\n"
        f"  query + choice rows: {query + cont} (hypothesis runs each in full; the sweep runs each distinct query "
        f"once ({sum(len(q) for q in {tuple(p[0]) for p in pairs})}), then per block the last query token and "
        f"the choice tokens: {n} x {cont})\n"
        f"  regular prompts (sweep only): {sum(map(len, fulls))}"
    )
    print(
        "forward passes (block 0's runs: the sweep replays it below every patch): "
        + ", ".join(f"{name} {counts['passes']} ({counts['block 0']})" for name, counts in passes.items())
    )
    print(
        f"\n{args.task}: {prompts} dev prompts ({len(requests)} choice requests) from {[d.split for d in sets]}, "
        f"{args.num_fewshot}-shot, {len(fixed.blocks)} blocks, hypothesis at block {args.layer}, "
        f"batch size {args.batch_size}, {torch.get_num_threads()} thread(s), best of {args.repeats}"
    )
    print("CPU seconds of this process (immune to other processes on a shared machine; wall time beside it)")
    for name in cases:
        split = ", ".join(f"{k} {v:.1f} s" for k, v in parts[name].items())
        print(f"{name:11} {best[name]:8.1f} s CPU {wall[name]:8.1f} s wall   ({split})")
    print(
        f"sweep / hypothesis: {best['sweep'] / best['hypothesis']:.2f} CPU, "
        f"{wall['sweep'] / wall['hypothesis']:.2f} wall   (target <= 3)"
    )
    for half, (per_block, baseline, regular) in enumerate(outputs["sweep"]):
        curve = per_block.float().mean(-1)
        print(
            f"half {half}: best block {int(curve.argmax())}, baseline {baseline.float().mean():.3f}, "
            f"regular {regular.float().mean():.3f}, curve {[round(v, 3) for v in curve.tolist()]}"
        )
    if args.profile:
        for name, case in (("sweep", full_sweep), ("hypothesis", hypothesis)):
            profiler = cProfile.Profile()
            profiler.runcall(case)
            print(f"--- cProfile of one {name}")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(15)
            pstats.Stats(profiler).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
