"""Time of ``taskvec compare --methods`` (one process: regular and baseline once, hypothesis per method, one
loaded model) against a separate run per mode and per method, each loading the model itself.

    python benchmarks/bench_methods.py [--tasks tv_antonyms] [--methods hendel,elicit,task_mean] [--limit 20]
                                       [--num_dev 10] [--batch_size 8] [--threads 1]

Both sides sweep every method's layer afresh (``layer_cache=off``). The ratio uses this process's CPU time,
which other processes on a shared machine barely change (with one thread); wall time is printed beside it.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch


def timed(run) -> tuple[float, float]:
    cpu, wall = time.process_time(), time.perf_counter()
    run()
    return time.process_time() - cpu, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="tv_antonyms")
    parser.add_argument("--methods", default="hendel,elicit,task_mean")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--num_dev", type=int, default=10)
    parser.add_argument("--batch_size", default="8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval_taskvec.comparison import run_modes

    model_args = f"pretrained=embedded,num_dev={args.num_dev},layer_cache=off"
    options = dict(limit=args.limit, batch_size=args.batch_size, device="cpu", log_samples=True)
    methods = args.methods.split(",")
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        run_modes(model_args, args.tasks, out / "warm-up", modes="baseline", **options)  # converts the model once
        together = timed(lambda: run_modes(model_args, args.tasks, out / "together", methods=methods, **options))
        apart = [0.0, 0.0]
        for mode, method in [("regular", None), ("baseline", None), *(("hypothesis", m) for m in methods)]:
            own = model_args + (f",method={method}" if method else "")
            where = out / f"{mode}-{method}"
            cpu, wall = timed(lambda own=own, at=where, mode=mode: run_modes(own, args.tasks, at, mode, **options))
            apart = [apart[0] + cpu, apart[1] + wall]
    print(f"tasks {args.tasks}, methods {args.methods}, limit {args.limit}, num_dev {args.num_dev}")
    print("| run | CPU s | wall s |\n|---|---|---|")
    print(f"| compare --methods (one process) | {together[0]:.1f} | {together[1]:.1f} |")
    print(f"| {2 + len(methods)} separate runs | {apart[0]:.1f} | {apart[1]:.1f} |")
    print(f"| ratio | {together[0] / apart[0]:.2f} | {together[1] / apart[1]:.2f} |")


if __name__ == "__main__":
    main()
