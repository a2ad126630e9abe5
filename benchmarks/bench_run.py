"""What a whole hypothesis run costs against stock ``--model hf``, as a user feels it: a fresh model object per run
(loaded, fingerprinted, its layer choice read from the cache, its dev prompts rendered for the cache key), then
lm-eval's own ``simple_evaluate``; stock and hf-taskvec alternate, best of ``--repeats``.

    python benchmarks/bench_run.py [--task tv_letter_to_upper] [--max_gen_toks 1] [--batch_size 8]

Prints seconds per phase (wall and this process's CPU time). The layer choice is swept once before timing (a
run with the choice cached is what the ratio is about); lm-eval's task index is built once, as its CLI does
at start-up for both.
"""

from __future__ import annotations

import argparse
import os
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="tv_letter_to_upper")
    parser.add_argument("--max_gen_toks", type=int, default=1)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--pretrained", default="embedded")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path
    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.tasks import task_dir

    path = embedded_model_path() if args.pretrained == EMBEDDED_NAME else args.pretrained
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    common = dict(pretrained=path, device="cpu", batch_size=args.batch_size)
    builders = {
        "stock hf": lambda: HFLM(**common),
        "hf-taskvec hypothesis": lambda: TaskVectorLM(mode="hypothesis", **common),
    }

    def evaluate(lm):
        return lm_eval.simple_evaluate(
            model=lm,
            tasks=[args.task],
            task_manager=manager,
            log_samples=False,
            gen_kwargs=f"max_gen_toks={args.max_gen_toks}",
            verbosity="WARNING",
        )

    evaluate(builders["hf-taskvec hypothesis"]())  # the layer choice, swept once (or read) before timing
    best = {name: {} for name in builders}
    for _ in range(args.repeats):
        for name, build in builders.items():
            wall, cpu = time.perf_counter(), time.process_time()
            lm = build()
            loaded = time.perf_counter(), time.process_time()
            evaluate(lm)
            done = time.perf_counter(), time.process_time()
            times = {
                "load": (loaded[0] - wall, loaded[1] - cpu),
                "evaluate": (done[0] - loaded[0], done[1] - loaded[1]),
            }
            for phase, (wall, cpu) in times.items():
                old = best[name].get(phase, (float("inf"), float("inf")))
                best[name][phase] = (min(old[0], wall), min(old[1], cpu))
    print(
        f"\n{args.task}, max_gen_toks={args.max_gen_toks}, batch size {args.batch_size}, {torch.get_num_threads()} "
        f"thread(s), best of {args.repeats} (wall s / CPU s)"
    )
    stock = best["stock hf"]
    for name, phases in best.items():
        cells = "  ".join(f"{phase} {wall:6.2f} / {cpu:6.2f}" for phase, (wall, cpu) in phases.items())
        total = sum(cpu for _, cpu in phases.values()) / sum(cpu for _, cpu in stock.values())
        ratio = phases["evaluate"][1] / stock["evaluate"][1]
        print(f"{name:24} {cells}   evaluate x{ratio:.2f}, whole run x{total:.2f} (CPU)")


if __name__ == "__main__":
    main()
