"""``taskvec export``: θ per task and layer as a safetensors file, and :func:`load_thetas` to read it back for
one model, so that θ can stand in for the demonstrations (a compressed prompt).

The file holds one float32 tensor [hidden] per (task, layer), named ``{task}@{layer}``: θ averaged over
``num_sets`` demonstration sets. Its header metadata (all strings) holds ``format``, ``model`` (JSON: the
exporting model's name, architecture, sizes, dtype and weights fingerprint) and ``thetas`` (JSON: per tensor
its task, layer, prompt format, number of demonstrations and dummies, seed and number of sets averaged).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from lm_eval_taskvec.analyses.common import (demonstration_sets, load_tasks, model_identity, num_fewshot_of,
                                             open_model, parse_layer, write_table)
from lm_eval_taskvec.theta import task_vectors

FORMAT = "lm-eval-taskvec/theta/1"
FILE_NAME = "thetas.safetensors"
IDENTITY = ("model_type", "num_blocks", "vocab_size", "weights")  # what must match besides the hidden size


@dataclass(frozen=True)
class StoredTheta:
    task: str
    layer: int  # 0-based block whose output θ is, and where it is patched
    theta: torch.Tensor  # [hidden], float32, on the CPU
    info: dict  # prompt_format, num_fewshot, num_dummy, seed, num_sets


@dataclass(frozen=True)
class ThetaFile:
    path: str
    model: dict  # identity of the model that exported it
    thetas: dict[tuple[str, int], StoredTheta]  # (task, layer) -> θ

    def get(self, task: str, layer: int | None = None) -> StoredTheta:
        """θ of ``task`` at ``layer``; with ``layer=None``, the task's only stored layer."""
        layers = sorted(block for name, block in self.thetas if name == task)
        if not layers:
            raise ValueError(f"theta_path={self.path} holds no θ for task {task!r}, only for "
                             f"{sorted({name for name, _ in self.thetas})}: run taskvec export --tasks {task}")
        if layer is None and len(layers) > 1:
            raise ValueError(f"theta_path={self.path} holds θ of {task!r} at blocks {layers}: pass layer=<one of them>")
        layer = layers[0] if layer is None else layer
        if (task, layer) not in self.thetas:
            raise ValueError(f"theta_path={self.path} holds θ of {task!r} at blocks {layers}, not at block {layer}: "
                             f"pass layer=<one of them>, or export block {layer}")
        return self.thetas[(task, layer)]


def main(args) -> ThetaFile:
    """``taskvec export``, from its parsed command-line options."""
    lm = open_model(args.model_args, args.batch_size, args.device)
    layers = [part.strip() for part in args.layers.split(",") if part.strip()] if args.layers else [args.layer]
    return run(lm, load_tasks(args.tasks, args.include_path), args.output_path, layers=layers,
               num_sets=args.num_sets, num_fewshot=args.num_fewshot, seed=args.seed)


def run(lm, tasks: dict, output_path, layers=("auto",), num_sets: int = 50, num_fewshot: int | None = None,
        seed: int = 1234) -> ThetaFile:
    """Mean θ over ``num_sets`` demonstration sets per task at each of ``layers``, written to
    ``output_path``/thetas.safetensors with a listing thetas.{md,csv}; returns what was written."""
    entries = []
    for name in tqdm(list(tasks), desc="export: θ per task"):
        task = tasks[name]
        blocks = list(dict.fromkeys(parse_layer(lm, name, layer) for layer in layers))
        k = num_fewshot_of(task, num_fewshot)
        requests = demonstration_sets(task, num_sets, k, seed)
        means = task_vectors(lm, requests, blocks).mean(1)
        info = {"prompt_format": prompt_format(task, requests[0]), "num_fewshot": k, "num_dummy": lm.num_dummy,
                "seed": seed, "num_sets": num_sets}
        entries += [StoredTheta(name, block, mean.float().cpu().contiguous(), info) for block, mean in zip(blocks, means)]
    out = Path(output_path)
    out.mkdir(parents=True, exist_ok=True)
    saved = save_thetas(out / FILE_NAME, lm, entries)
    listing = [{"task": e.task, "layer": e.layer, "norm": e.theta.norm().item(), "num_fewshot": e.info["num_fewshot"],
                "num_sets": num_sets} for e in entries]
    table = write_table(listing, out / "thetas")
    print(f"{table}wrote {out / FILE_NAME} (use: --model_args mode=hypothesis,theta_path={out / FILE_NAME})")
    return saved


def prompt_format(task, request) -> dict:
    """How the demonstrations behind θ were written: the task's templates and one full context."""
    config = task.config
    return {"doc_to_text": str(config.doc_to_text), "doc_to_target": str(config.doc_to_target),
            "target_delimiter": config.target_delimiter, "fewshot_delimiter": config.fewshot_delimiter,
            "description": str(config.description or ""), "example_context": request.args[0]}


def save_thetas(path, lm, entries: list[StoredTheta]) -> ThetaFile:
    """Write ``entries`` (θ of ``lm``) to a safetensors file at ``path``."""
    keys = [f"{e.task}@{e.layer}" for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("two θ for the same task and layer: export each (task, layer) once")
    metadata = {"format": FORMAT, "model": json.dumps(model_identity(lm)),
                "thetas": json.dumps({key: {"task": e.task, "layer": e.layer, **e.info} for key, e in zip(keys, entries)})}
    save_file({key: e.theta for key, e in zip(keys, entries)}, str(path), metadata=metadata)
    return ThetaFile(str(path), model_identity(lm), {(e.task, e.layer): e for e in entries})


def load_thetas(path, lm) -> ThetaFile:
    """Every θ in a file written by ``taskvec export``, refusing a file made for another model than ``lm``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"theta_path={path} does not exist: write one with taskvec export --output_path DIR")
    try:
        with safe_open(str(path), "pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(f"theta_path={path} is not a safetensors file ({err}): write one with taskvec export") from None
    if metadata.get("format") != FORMAT:
        raise ValueError(f"theta_path={path} is not a θ file of taskvec export (format {metadata.get('format')!r}, "
                         f"expected {FORMAT!r})")
    stored, current = json.loads(metadata["model"]), model_identity(lm)
    if stored["hidden_size"] != current["hidden_size"]:
        raise ValueError(f"theta_path={path} holds θ of hidden size {stored['hidden_size']} from model "
                         f"{stored['name']!r}; this model {current['name']!r} has hidden size {current['hidden_size']}: "
                         "export θ with this model (taskvec export --model_args pretrained=...)")
    if any(stored[key] != current[key] for key in IDENTITY):
        dtype = (f" (exported in {stored['dtype']}, loaded in {current['dtype']}: load the model with "
                 f"dtype={stored['dtype']} or export again)" if stored["dtype"] != current["dtype"] else "")
        raise ValueError(f"theta_path={path} was made for model {_describe(stored)}, not for this model "
                         f"{_describe(current)}{dtype}: export θ with this model (taskvec export)")
    thetas = {}
    for key, info in json.loads(metadata["thetas"]).items():
        info = dict(info)
        task, layer = info.pop("task"), info.pop("layer")
        thetas[(task, layer)] = StoredTheta(task, layer, tensors[key], info)
    return ThetaFile(str(path), stored, thetas)


def _describe(identity: dict) -> str:
    return (f"{identity['name']!r} ({identity['model_type']}, {identity['num_blocks']} blocks, vocabulary "
            f"{identity['vocab_size']}, {identity['dtype']}, weights {identity['weights'][:12]})")
