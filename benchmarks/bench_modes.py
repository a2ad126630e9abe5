"""Time and peak memory of each mode against stock ``--model hf``, in one process, on the same requests.

    python benchmarks/bench_modes.py [--task tv_list_last] [--limit 64] [--batch_size 8] [--threads 1]

Ratios use this process's CPU time, which other processes on a shared machine barely change (with one
thread); wall time is printed beside it and is only comparable on an otherwise idle machine. With
``--device cuda`` the model runs on the GPU: times are then wall time between synchronized points and the
memory is the GPU's peak allocation. ``build_cases`` and ``measure`` drive the same cases for a model built
elsewhere (benchmarks/gpu_check.py).
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


class PeakGpuMemory:
    """Peak GPU memory allocated above the level at entry (MiB), and the absolute peak (``total_mib``)."""

    def __enter__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        self.mib, self.total_mib = (peak - self.start) / 2**20, peak / 2**20


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def requests_of(task, limit: int):
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    return list(task.instances)


def build_cases(model, tokenizer, task_name: str, limit: int, batch_size: int, layer: int, max_gen_toks=None):
    """The benchmark's cases on ``model`` (already on its device), as {name: callable}, and what they run on."""
    from lm_eval.api.samplers import FirstNSampler
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.selection import dev_sets, sweep
    from lm_eval_taskvec.tasks import task_dir

    common = dict(pretrained=model, tokenizer=tokenizer, device=str(model.device), batch_size=batch_size)
    manager = TaskManager(include_path=str(task_dir()), include_defaults=False)
    task = manager.load([task_name])["tasks"][task_name]
    if max_gen_toks is not None:
        task.set_config(key="generation_kwargs", value={"max_gen_toks": max_gen_toks}, update=True)
    per_doc = requests_of(task, limit)
    stock = HFLM(**common)
    ours = {mode: TaskVectorLM(mode=mode, layer=layer, **common) for mode in ("regular", "hypothesis", "baseline")}
    together = TaskVectorLM(mode="regular", layer=layer, **common)
    together.set_mode("regular", shared_modes=("regular", "hypothesis", "baseline"))
    sweeper = TaskVectorLM(mode="hypothesis", layer="auto", num_dev=limit, layer_cache="off", **common)
    (dev,) = dev_sets(sweeper.settings, task_name)  # per-document S, like the test requests
    dev_requests = [r for ex in dev.examples for r in ex.requests]
    task.sampler = FirstNSampler(list(task.fewshot_docs()), rnd=1234)  # every document gets the same S
    shared = requests_of(task, limit)

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
        "full sweep (all blocks, dev split)": fresh(sweeper, lambda: sweep.score(sweeper, task_name, [dev])),
    }
    stock.generate_until(per_doc[:batch_size], disable_tqdm=True)  # warm-up
    info = {"documents": len(per_doc), "generation": per_doc[0].args[1], "dev_prompts": len(dev_requests)}
    return cases, info


def measure(cases: dict, repeats: int, cuda: bool = False):
    """Best of ``repeats`` rounds per case: (CPU s, wall s, peak MiB) dicts. On CUDA the first is wall time too,
    between synchronized points, and the memory is the GPU's peak allocation above the case's start."""
    times, walls, memory = dict.fromkeys(cases, float("inf")), dict.fromkeys(cases, float("inf")), {}
    for _ in range(repeats):  # round robin, so that no case is always the first after some other
        for name, case in cases.items():
            gc.collect()
            with PeakGpuMemory() if cuda else PeakMemory() as peak:
                start, start_wall = time.process_time(), time.perf_counter()
                case()
                if cuda:
                    torch.cuda.synchronize()
                wall = time.perf_counter() - start_wall
                times[name] = min(times[name], wall if cuda else time.process_time() - start)
                walls[name] = min(walls[name], wall)
            memory[name] = max(memory.get(name, 0.0), peak.mib)
    return times, walls, memory


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
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: GPU wall time and GPU memory")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lm_eval_taskvec.embedded import EMBEDDED_NAME, embedded_model_path

    path = embedded_model_path() if args.pretrained == EMBEDDED_NAME else args.pretrained
    model, tokenizer = AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)
    model = model.to(args.device)
    cases, info = build_cases(model, tokenizer, args.task, args.limit, args.batch_size, args.layer, args.max_gen_toks)
    cuda = model.device.type == "cuda"
    times, walls, memory = measure(cases, args.repeats, cuda)

    base = times["stock hf, regular"]
    clock = "GPU s" if cuda else "CPU s"
    print(
        f"\n{args.task}: {info['documents']} documents, generation {info['generation']}, batch size "
        f"{args.batch_size}, layer {args.layer}, {torch.get_num_threads()} thread(s), best of {args.repeats}; "
        f"{info['dev_prompts']} dev prompts, {len(model.model.layers) if hasattr(model, 'model') else '?'} blocks"
    )
    print(f"{'mode':38} {clock:>8} {'x stock':>8} {'wall s':>8} {'x stock':>8} {'peak MiB':>9}")
    for name, seconds in times.items():
        print(
            f"{name:38} {seconds:8.2f} {seconds / base:8.2f} {walls[name]:8.2f} "
            f"{walls[name] / walls['stock hf, regular']:8.2f} {memory[name]:9.1f}"
        )
    ratio = times["full sweep (all blocks, dev split)"] / times["hypothesis on the dev split"]
    print(f"{'full sweep / hypothesis on the same split':38} {ratio:8.2f} ({'GPU' if cuda else 'CPU'} time)")


if __name__ == "__main__":
    main()
