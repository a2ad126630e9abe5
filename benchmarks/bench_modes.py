"""Time and peak memory of each mode against stock ``--model hf``, in one process, on the same requests.

    python benchmarks/bench_modes.py [--task tv_list_last] [--limit 64] [--batch_size 8] [--threads 1]

Ratios use this process's CPU time, which other processes on a shared machine barely change (with one
thread); wall time is printed beside it and is only comparable on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import gc
import os
import resource
import threading
import time

import torch


class PeakMemory:
    """Peak resident memory above the level at entry, sampled every 5 ms (MiB)."""

    def __enter__(self):
        self.start = self.peak = _rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, _rss())
            time.sleep(0.005)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.mib = (self.peak - self.start) / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def requests_of(task, limit: int):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--task", default="tv_list_last")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2, help="best of N runs per mode")
    parser.add_argument("--pretrained", default="embedded")
    parser.add_argument(
        "--max_gen_toks",
        type=int,
        default=None,
        help="override the task's limit on new tokens (1 = the paper's first-token protocol)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from lm_eval.api.samplers import FirstNSampler
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path
    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.selection import dev_sets, sweep
    from lm_eval_taskvec.tasks import task_dir

    path = embedded_model_path() if args.pretrained == EMBEDDED_NAME else args.pretrained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    common = dict(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=args.batch_size)
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    task = manager.load([args.task])["tasks"][args.task]
    if args.max_gen_toks is not None:
        task.set_config(key="generation_kwargs", value={"max_gen_toks": args.max_gen_toks}, update=True)
    per_doc = requests_of(task, args.limit)
    stock = HFLM(**common)
    ours = {mode: TaskVectorLM(mode=mode, layer=args.layer, **common) for mode in ("regular", "hypothesis", "baseline")}
    together = TaskVectorLM(mode="regular", layer=args.layer, **common)
    together.set_mode("regular", shared_modes=("regular", "hypothesis", "baseline"))
    sweeper = TaskVectorLM(mode="hypothesis", layer="auto", num_dev=args.limit, layer_cache="off", **common)
    (dev,) = dev_sets(sweeper.settings, args.task)  # per-document S, like the test requests
    dev_requests = [r for ex in dev.examples for r in ex.requests]
    task.sampler = FirstNSampler(list(task.fewshot_docs()), rnd=1234)  # every document gets the same S
    shared = requests_of(task, args.limit)

    def fresh(lm, call):
        def again():
            lm.thetas.clear()  # every repeat extracts θ again
            return call()

        return again

    def separately():
        for mode in ("regular", "hypothesis", "baseline"):
            ours[mode].generate_until(per_doc, disable_tqdm=True)

    def all_modes_together():
        for mode in ("regular", "hypothesis", "baseline"):
            together.set_mode(mode)
            together.generate_until(per_doc, disable_tqdm=True)
        together.set_mode("regular")

    cases = {
        "stock hf, regular": lambda: stock.generate_until(per_doc, disable_tqdm=True),
        "hf-taskvec regular": lambda: ours["regular"].generate_until(per_doc, disable_tqdm=True),
        "hypothesis, per-document S": fresh(
            ours["hypothesis"], lambda: ours["hypothesis"].generate_until(per_doc, True)
        ),
        "hypothesis, shared S": fresh(ours["hypothesis"], lambda: ours["hypothesis"].generate_until(shared, True)),
        "baseline": lambda: ours["baseline"].generate_until(per_doc, disable_tqdm=True),
        "3 modes, separate runs": fresh(ours["hypothesis"], separately),
        "3 modes, one model (shared S)": fresh(together, all_modes_together),
        "hypothesis on the dev split": fresh(
            ours["hypothesis"], lambda: ours["hypothesis"].generate_until(dev_requests, True)
        ),
        "full sweep (all blocks, dev split)": fresh(sweeper, lambda: sweep.score(sweeper, args.task, [dev])),
    }
    stock.generate_until(per_doc[: args.batch_size], disable_tqdm=True)  # warm-up
    times, walls, memory = dict.fromkeys(cases, float("inf")), dict.fromkeys(cases, float("inf")), {}
    for _ in range(args.repeats):  # round robin, so that no case is always the first after some other
        for name, case in cases.items():
            gc.collect()
            with PeakMemory() as peak:
                start, start_wall = time.process_time(), time.perf_counter()
                case()
                times[name] = min(times[name], time.process_time() - start)
                walls[name] = min(walls[name], time.perf_counter() - start_wall)
            memory[name] = max(memory.get(name, 0.0), peak.mib)

    base = times["stock hf, regular"]
    gen = per_doc[0].args[1]
    print(
        f"\n{args.task}: {len(per_doc)} documents, generation {gen}, batch size {args.batch_size}, layer {args.layer}, "
        f"{torch.get_num_threads()} thread(s), best of {args.repeats}; {len(dev_requests)} dev prompts, "
        f"{len(model.model.layers) if hasattr(model, 'model') else '?'} blocks"
    )
    print(f"{'mode':38} {'CPU s':>8} {'x stock':>8} {'wall s':>8} {'x stock':>8} {'peak MiB':>9}")
    for name, seconds in times.items():
        print(
            f"{name:38} {seconds:8.2f} {seconds / base:8.2f} {walls[name]:8.2f} "
            f"{walls[name] / walls['stock hf, regular']:8.2f} {memory[name]:9.1f}"
        )
    ratio = times["full sweep (all blocks, dev split)"] / times["hypothesis on the dev split"]
    print(f"{'full sweep / hypothesis on the same split':38} {ratio:8.2f} (CPU time)")


if __name__ == "__main__":
    main()
