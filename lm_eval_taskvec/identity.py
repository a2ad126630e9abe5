"""What tells one model's weights from another's, for the layer cache and θ files."""

from __future__ import annotations

import hashlib

import torch
from accelerate.utils import align_module_device
from torch import nn
from tqdm import tqdm


def weights_fingerprint(model: nn.Module, progress: bool = False) -> str:
    """Changes when any weight changes: every tensor's sum and norm (in float64) and a strided sample of it.
    Remembered per model until a parameter is replaced or modified in place (torch's version counters). Reading
    every weight takes seconds on a large model: ``progress`` shows it."""
    state = tuple((name, param.data_ptr(), param._version) for name, param in model.named_parameters())
    remembered = getattr(model, "_taskvec_fingerprint", None)
    if remembered is not None and remembered[0] == state:
        return remembered[1]
    digest = hashlib.sha256()
    with torch.no_grad():
        named = list(model.named_parameters())
        for name, param in tqdm(named, desc="weights fingerprint (layer cache key)", disable=not progress):
            flat = _loaded(model, name, param).detach().reshape(-1)
            sample = flat[:: max(1, flat.numel() // 1024)].float().cpu()
            summary = torch.stack([flat.sum(dtype=torch.float64), torch.linalg.vector_norm(flat, dtype=torch.float64)])
            digest.update(f"{name}{tuple(param.shape)}".encode())
            digest.update(sample.numpy().tobytes() + summary.cpu().numpy().tobytes())
    model._taskvec_fingerprint = (state, digest.hexdigest())
    return digest.hexdigest()


def _loaded(model: nn.Module, name: str, param: torch.Tensor) -> torch.Tensor:
    """The weight itself: an offloaded one (accelerate leaves ``meta`` in its place, ``parallelize=True``) is
    read through its module's offload hook."""
    if param.device.type != "meta":
        return param
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    with align_module_device(module, torch.device("cpu")):
        return getattr(module, leaf).detach().clone()


def model_identity(model: nn.Module, num_blocks: int) -> dict:
    """A model's name, architecture, sizes, dtype and the fingerprint of every weight (the layer cache's)."""
    embeddings = model.get_input_embeddings()
    return {
        "name": str(getattr(model.config, "_name_or_path", "") or type(model).__name__),
        "model_type": str(getattr(model.config, "model_type", "")),
        "hidden_size": int(embeddings.embedding_dim),
        "num_blocks": num_blocks,
        "vocab_size": int(embeddings.num_embeddings),
        "dtype": str(model.dtype).replace("torch.", ""),
        "weights": weights_fingerprint(model),
    }
