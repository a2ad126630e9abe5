"""θ as a file: the format ``taskvec export`` writes and ``theta_path=`` reads.

A safetensors file with one float32 tensor [hidden] per (task, layer), named ``{task}@{layer}``. Its header
metadata (all strings) holds ``format``, ``model`` (JSON: the exporting model's name, architecture, sizes,
dtype and weights fingerprint) and ``thetas`` (JSON: per tensor its task, layer, prompt format, number of
demonstrations and dummies, seed, number of sets averaged, and the method, op and scale it is applied with;
a function vector's record holds its heads and prompts in place of sets).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from lm_eval_taskvec.identity import model_identity

FORMAT = "lm-eval-taskvec/theta/1"
FILE_NAME = "thetas.safetensors"
MUST_MATCH = ("model_type", "num_blocks", "vocab_size", "weights")  # what must match besides the hidden size


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
            raise ValueError(
                f"theta_path={self.path} holds no θ for task {task!r}, only for "
                f"{sorted({name for name, _ in self.thetas})}: run taskvec export --tasks {task}"
            )
        if layer is None and len(layers) > 1:
            raise ValueError(f"theta_path={self.path} holds θ of {task!r} at blocks {layers}: pass layer=<one of them>")
        layer = layers[0] if layer is None else layer
        if (task, layer) not in self.thetas:
            raise ValueError(
                f"theta_path={self.path} holds θ of {task!r} at blocks {layers}, not at block {layer}: "
                f"pass layer=<one of them>, or export block {layer}"
            )
        return self.thetas[(task, layer)]


def made_with(file: ThetaFile) -> dict:
    """How ``theta_path=`` applies the file's θ: the method, op and scale they were exported with (files written
    before methods existed hold Hendel's θ, replaced)."""
    found = {
        (e.info.get("method", "hendel"), e.info.get("op", "replace"), float(e.info.get("scale", 1.0)))
        for e in file.thetas.values()
    }
    if len(found) != 1:
        raise ValueError(f"theta_path={file.path} mixes θ of several methods {sorted(found)}: export one per file")
    method, op, scale = found.pop()
    return {"method": method, "op": op, "scale": scale}


def save_thetas(path, lm, entries: list[StoredTheta]) -> ThetaFile:
    """Write ``entries`` (θ of ``lm``, anything with ``.model`` and ``.blocks``) to a safetensors file at ``path``."""
    keys = [f"{e.task}@{e.layer}" for e in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("two θ for the same task and layer: export each (task, layer) once")
    identity = model_identity(lm.model, len(lm.blocks))
    metadata = {
        "format": FORMAT,
        "model": json.dumps(identity),
        "thetas": json.dumps({key: {"task": e.task, "layer": e.layer, **e.info} for key, e in zip(keys, entries)}),
    }
    save_file({key: e.theta for key, e in zip(keys, entries)}, str(path), metadata=metadata)
    return ThetaFile(str(path), identity, {(e.task, e.layer): e for e in entries})


def load_thetas(path, lm) -> ThetaFile:
    """Every θ in a file written by ``taskvec export``, refusing a file made for another model than ``lm``
    (anything with ``.model`` and ``.blocks``, e.g. an hf-taskvec model).

    Args:
        path: the ``thetas.safetensors`` file.
        lm: the model the θ will be patched into.
    Returns:
        A ``ThetaFile``; ``.get(task, layer=None)`` gives a ``StoredTheta`` (θ float32 [hidden], its block, its
        metadata).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"theta_path={path} does not exist: write one with taskvec export --output_path DIR")
    try:
        with safe_open(str(path), "pt", device="cpu") as file:
            metadata = file.metadata() or {}
            tensors = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError) as err:
        raise ValueError(
            f"theta_path={path} is not a safetensors file ({err}): write one with taskvec export"
        ) from None
    if metadata.get("format") != FORMAT:
        raise ValueError(
            f"theta_path={path} is not a θ file of taskvec export (format {metadata.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    stored, current = json.loads(metadata["model"]), model_identity(lm.model, len(lm.blocks))
    if stored["hidden_size"] != current["hidden_size"]:
        raise ValueError(
            f"theta_path={path} holds θ of hidden size {stored['hidden_size']} from model "
            f"{stored['name']!r}; this model {current['name']!r} has hidden size {current['hidden_size']}: "
            "export θ with this model (taskvec export --model_args pretrained=...)"
        )
    if any(stored[key] != current[key] for key in MUST_MATCH):
        dtype = (
            f" (exported in {stored['dtype']}, loaded in {current['dtype']}: load the model with "
            f"dtype={stored['dtype']} or export again)"
            if stored["dtype"] != current["dtype"]
            else ""
        )
        raise ValueError(
            f"theta_path={path} was made for model {_describe(stored)}, not for this model "
            f"{_describe(current)}{dtype}: export θ with this model (taskvec export)"
        )
    thetas = {}
    for key, info in json.loads(metadata["thetas"]).items():
        info = dict(info)
        task, layer = info.pop("task"), info.pop("layer")
        thetas[(task, layer)] = StoredTheta(task, layer, tensors[key], info)
    return ThetaFile(str(path), stored, thetas)


def _describe(identity: dict) -> str:
    return (
        f"{identity['name']!r} ({identity['model_type']}, {identity['num_blocks']} blocks, vocabulary "
        f"{identity['vocab_size']}, {identity['dtype']}, weights {identity['weights'][:12]})"
    )
