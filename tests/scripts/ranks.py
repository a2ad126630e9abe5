"""One rank of a data-parallel hf-taskvec run on the CPU (``torchrun --nproc_per_node N``, gloo): what it
evaluated, how often it swept for layer=auto, and (rank 0) every answer, written to ``--out``/rank<r>.json.

Stock HFLM shards requests across processes only when it counts GPUs (``gpus = torch.cuda.device_count()``):
on the CPU every rank would evaluate everything. The few lines marked SHIM set its rank and world size from
its own Accelerator, as it does on GPUs; the plugin itself does not change how HFLM shards.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import lm_eval  # noqa: E402
import torch  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from lm_eval_taskvec.model import TaskVectorLM  # noqa: E402
from lm_eval_taskvec.selection import sweep  # noqa: E402
from lm_eval_taskvec.tasks import task_dir  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--task", default="tv_letter_to_upper")
    parser.add_argument("--num_dev", type=int, default=8)
    parser.add_argument("--include_path", default=None)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    sweeps, choose = [], sweep.choose
    sweep.choose = lambda *a: sweeps.append(a[1]) or choose(*a)
    lm = TaskVectorLM(pretrained=args.model, mode="hypothesis", num_dev=args.num_dev, batch_size=4, device="cpu")
    accelerator = getattr(lm, "accelerator", None)
    if accelerator is not None:  # SHIM: what HFLM does on GPUs
        lm._rank, lm._world_size = accelerator.process_index, accelerator.num_processes
    seen, generate = [], lm.generate_until
    lm.generate_until = lambda requests, *a, **k: seen.extend(r.doc_id for r in requests) or generate(requests, *a, **k)
    plans, plan = {}, lm.plan

    def recorded(requests, *a, **k):
        found = plan(requests, *a, **k)
        for request, p in zip(requests, found):
            theta = lm.thetas.get(p.layer, p.theta_key).tolist()
            plans[request.doc_id] = {"query": p.query, "dummies": p.theta_key.dummies, "layer": p.layer, "theta": theta}
        return found

    lm.plan = recorded
    manager = TaskManager(include_path=[str(task_dir()), args.include_path or str(task_dir())], include_defaults=False)
    results = lm_eval.simple_evaluate(model=lm, tasks=[args.task], task_manager=manager, log_samples=True)
    record = {
        "rank": lm.rank,
        "world_size": lm.world_size,
        "documents": sorted(seen),
        "sweeps": sweeps,
        "plans": plans,
        "layer_selection": lm.layer_choices,
    }
    if results is not None:  # rank 0 gathers every rank's samples
        record["answers"] = {str(s["doc_id"]): s["filtered_resps"] for s in results["samples"][args.task]}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    Path(args.out, f"rank{lm.rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main()
