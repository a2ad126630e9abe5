"""``taskvec export``: mean θ per task and layer over ``num_sets`` demonstration sets (method=function_vector:
the task's function vector), written in the θ file format of :mod:`lm_eval_taskvec.thetafile`, so that θ can
stand in for the demonstrations (a compressed prompt)."""

from __future__ import annotations

from pathlib import Path

from tqdm import tqdm

from lm_eval_taskvec.analyses.common import (
    block_of,
    demonstration_sets,
    function_vectors,
    load_tasks,
    num_fewshot_of,
    open_model,
    write_table,
)
from lm_eval_taskvec.comparison.cli import chat_options
from lm_eval_taskvec.theta import task_vectors
from lm_eval_taskvec.thetafile import FILE_NAME, StoredTheta, ThetaFile, save_thetas


def main(args) -> ThetaFile:
    """``taskvec export``, from its parsed command-line options."""
    lm = open_model(args.model_args, args.batch_size, args.device, getattr(args, "method", None))
    layers = [part.strip() for part in args.layers.split(",") if part.strip()] if args.layers else [args.layer]
    return export_thetas(
        lm,
        load_tasks(args.tasks, args.include_path, lm, chat_options(args)),
        args.output_path,
        layers=layers,
        num_sets=args.num_sets,
        num_fewshot=args.num_fewshot,
        seed=args.seed,
    )


def export_thetas(
    lm,
    tasks: dict,
    output_path,
    layers=("auto",),
    num_sets: int = 50,
    num_fewshot: int | None = None,
    seed: int = 1234,
    method: str | None = None,
) -> ThetaFile:
    """Mean θ over ``num_sets`` demonstration sets per task at each of ``layers``, written to
    ``output_path``/thetas.safetensors with a listing thetas.{md,csv}; returns what was written. ``method``
    (else the model's own) decides layer=auto's choice and how ``theta_path=`` applies θ (its op and scale)."""
    if method:
        lm.set_method(method)
    heads = lm.settings.vector == "function_vector"
    entries = []
    for name in tqdm(list(tasks), desc="export: θ per task"):
        task = tasks[name]
        blocks = list(dict.fromkeys(block_of(lm, name, layer) for layer in layers))
        k = num_fewshot_of(task, num_fewshot)
        requests = demonstration_sets(task, num_sets, k, seed)
        info = {
            "prompt_format": prompt_format(task, requests[0]),
            "num_fewshot": k,
            "num_dummy": lm.settings.num_dummy,
            "seed": seed,
            "num_sets": num_sets,
            "method": lm.settings.method,
            "op": lm.settings.op,
            "scale": lm.settings.scale,
        }
        if heads:
            vectors, record = function_vectors(lm, name, task, blocks, num_fewshot)
            info |= {"num_fewshot": task.get_config("num_fewshot"), "num_sets": None, "function_vector": record}
        else:
            vectors = task_vectors(lm, requests, blocks).mean(1)
        entries += [
            StoredTheta(name, block, vector.float().cpu().contiguous(), info) for block, vector in zip(blocks, vectors)
        ]
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    saved = save_thetas(out / FILE_NAME, lm, entries)
    listing = [
        {
            "task": e.task,
            "layer": e.layer,
            "norm": e.theta.norm().item(),
            "num_fewshot": e.info["num_fewshot"],
            "num_sets": e.info["num_sets"],
        }
        for e in entries
    ]
    table = write_table(listing, out / "thetas")
    print(f"{table}wrote {out / FILE_NAME} (use: --model_args mode=hypothesis,theta_path={out / FILE_NAME})")
    return saved


def prompt_format(task, request) -> dict:
    """How the demonstrations behind θ were written: the task's templates and one full context."""
    config = task.config
    return {
        "doc_to_text": str(config.doc_to_text),
        "doc_to_target": str(config.doc_to_target),
        "target_delimiter": config.target_delimiter,
        "fewshot_delimiter": config.fewshot_delimiter,
        "description": str(config.description or ""),
        "example_context": request.args[0],
        **({"chat": chat} if (chat := _chat_settings(task)) else {}),
    }


def _chat_settings(task) -> dict | None:
    settings = getattr(task, "taskvec_prompt_settings", None) or {}
    if not settings.get("apply_chat_template"):
        return None
    return {
        "apply_chat_template": settings["apply_chat_template"],
        "fewshot_as_multiturn": settings["fewshot_as_multiturn"],
    }
