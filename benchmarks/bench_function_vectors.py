"""Time of choosing a task's function vector (head means, AIE of every head, the vector) against one
``layer=auto`` sweep (Hendel's) of the same task on the same dev prompts, in one loaded model.

    python benchmarks/bench_function_vectors.py [--tasks tv_antonyms] [--num_dev 10] [--batch_size 8] [--threads 1]

Neither reads a cache (``layer_cache=off``); the dev prompts and the weights fingerprint, which both need, are
made before either is timed. The ratio uses this process's CPU time (one thread: other processes on a shared
machine barely change it); wall time is printed beside it.
"""

from __future__ import annotations

import argparse

import torch
from bench_methods import timed  # a sibling script: CPU and wall seconds of one call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="tv_antonyms")
    parser.add_argument("--num_dev", type=int, default=10)
    parser.add_argument("--batch_size", default="8")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from lm_eval_taskvec.analyses.common import load_tasks, open_model
    from lm_eval_taskvec.identity import weights_fingerprint
    from lm_eval_taskvec.selection import function_vector_of, select_layer
    from lm_eval_taskvec.selection.dev import dev_sets

    lm = open_model(f"pretrained=embedded,num_dev={args.num_dev},layer_cache=off", args.batch_size, "cpu")
    tasks = load_tasks(args.tasks)
    weights_fingerprint(lm.model)
    print(f"num_dev {args.num_dev}, batch_size {args.batch_size}, {args.threads} thread(s)")
    print("| task | layer=auto sweep CPU s (wall) | function vector CPU s (wall) | ratio CPU | top heads |")
    print("|---|---|---|---|---|")
    for name, task in tasks.items():
        lm.choice_cache.dev_sets(name, task, lm.settings, lambda name=name: dev_sets(lm.settings, name))
        lm.set_method("hendel")
        sweep = timed(lambda name=name: select_layer(lm, name))
        lm.thetas.clear()
        lm.set_method("function_vector")
        found = {}
        vector = timed(lambda name=name, found=found: found.update(record=function_vector_of(lm, name)[1]))
        lm.thetas.clear()
        heads = ", ".join(f"{t['layer']}.{t['head']}" for t in found["record"]["top_heads"][:3])
        print(
            f"| {name} | {sweep[0]:.1f} ({sweep[1]:.1f}) | {vector[0]:.1f} ({vector[1]:.1f}) | "
            f"{vector[0] / sweep[0]:.2f} | {heads}, ... |"
        )


if __name__ == "__main__":
    main()
