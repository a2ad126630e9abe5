"""The layer cache: ``layer=auto``'s choices in this process's memory and on disk, keyed by everything that
decides them (the model's name, revision, dtype, config and every weight, the task, its dev prompts, ``seed``,
``num_dummy`` and, for any method but Hendel's, the vector, operation and scale). Writes are atomic; a file
that is not a valid choice for this model is swept again."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path

import torch
from filelock import FileLock
from torch import nn

from lm_eval_taskvec.embedded import cache_dir
from lm_eval_taskvec.identity import weights_fingerprint
from lm_eval_taskvec.selection.criterion import DEFAULTS, REFERENCE_LOGLIKELIHOOD, REFERENCE_TOKENS
from lm_eval_taskvec.selection.dev import DevSet
from lm_eval_taskvec.settings import METHODS, Settings, read_method

log = logging.getLogger("lm_eval.taskvec")

CACHE_VERSION = 3  # bump when the sweep or the meaning of a cached choice changes


class LayerCache:
    """Choices by cache key: remembered for the process; read from and written to ``cache_dir()/layers`` as
    ``setting`` says (``on``: both, ``refresh``: sweep again and write, ``off``: neither). Processes sharing the
    folder (``accelerate launch``) sweep a key one at a time: the first sweeps, the others read its file."""

    def __init__(self, setting: str, warn_once: Callable[[str], None]):
        self.setting, self.warn_once = setting, warn_once
        self._memory: dict[str, dict] = {}
        self._started = time.time()  # refresh: a file written after this was swept again by this run
        self._dev_sets: dict[str, tuple[object, tuple, list[DevSet]]] = {}  # task -> (task object, what shapes, sets)
        # regular mode's scores of the dev prompts by (task, their tokens): a second method's sweep in this
        # process (taskvec compare --methods) neither runs them again nor, with θ kept, their demonstrations
        self.regular_scores: dict[tuple, torch.Tensor] = {}

    def dev_sets(self, task_name: str, task, settings: Settings, render: Callable[[], list[DevSet]]) -> list[DevSet]:
        """``task_name``'s dev prompts, rendered once per task object and prompt settings in this process: the
        cache key is built from them, and lm-eval takes seconds to render them (a run asks at every batch of
        requests). Shots and prompt settings can change on one task object between runs: they are compared."""
        shape = (
            # a method changes the patch, not the dev prompts
            replace(
                settings,
                **read_method("hendel"),
                top_heads=Settings.top_heads,
                attn_out_path=None,
                num_mean_prompts=None,
                num_aie_prompts=None,
            ),
            task.get_config("num_fewshot") if task is not None else None,
            json.dumps(getattr(task, "taskvec_prompt_settings", None), sort_keys=True, default=str),
        )
        known = self._dev_sets.get(task_name)
        if known is None or known[0] is not task or known[1] != shape:
            known = self._dev_sets[task_name] = (task, shape, render())
        return known[2]

    def path(self, key: str) -> Path:
        return cache_dir() / "layers" / f"{key}.json"

    def remembered(self, key: str) -> dict | None:
        return self._memory.get(key)

    def read_or_sweep(
        self, key: str, num_blocks: int, sweep: Callable[[], dict], valid: Callable[[dict], bool] | None = None
    ) -> dict:
        """The choice of ``key`` from disk (with its file as ``source``) or from ``sweep()``, written then; under
        the folder's lock, so that of several processes only the first sweeps (``off``: every process sweeps).
        ``valid`` checks an entry that is not a layer choice (a function vector's)."""
        path = self.path(key)
        with self._lock(path):
            choice = None
            if self.setting == "on" or (self.setting == "refresh" and _written_since(path, self._started)):
                choice = read_choice(path, num_blocks, valid)
            if choice is not None:
                choice |= {"source": str(path)}
            else:
                choice = sweep() | {"source": "sweep"}
                if self.setting != "off":
                    write_choice(path, choice, self.warn_once)
        self._memory[key] = choice
        return choice

    @contextmanager
    def _lock(self, path: Path):
        if self.setting == "off":
            yield
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(path.parent / ".lock")  # one for the folder: the processes of a run sweep in one order
            lock.acquire()
        except OSError:  # an unwritable folder: write_choice says so; nothing to share then
            yield
            return
        try:
            yield
        finally:
            lock.release()


def _written_since(path: Path, when: float) -> bool:
    try:
        return path.stat().st_mtime >= when
    except OSError:
        return False


def cache_key(
    model: nn.Module,
    revision,
    num_blocks: int,
    settings: Settings,
    task_name: str,
    sets: list[DevSet],
    criterion: str | None = None,
    progress: bool = False,
) -> str:
    """The key of a choice: what decides it. The criterion counts only where it is not the old default for the
    request type, so that choices cached before it was recorded stay valid."""
    config = model.config.to_dict()
    parts = [
        CACHE_VERSION,
        config.get("_name_or_path"),
        getattr(model.config, "_commit_hash", None),
        revision,
        str(model.dtype),
        json.dumps(config, sort_keys=True, default=str),
        weights_fingerprint(model, progress),
        num_blocks,
        task_name,
        settings.num_dummy,
        settings.seed,
        [
            (
                dev.split,
                sorted(dev.scored or ()),
                [(ex.doc_id, [r.args for r in ex.requests], ex.gold) for ex in dev.examples],
            )
            for dev in sets
        ],
    ]
    if criterion is not None and criterion not in DEFAULTS:
        parts.append({"criterion": criterion, "reference_tokens": REFERENCE_TOKENS})
    if settings.parts != METHODS["hendel"]:  # Hendel's keys stay as they were before methods existed
        parts.append(dict(zip(("vector", "op", "scale"), settings.parts)))
    if settings.vector == "function_vector":
        parts.append({"top_heads": settings.top_heads, "attn_out_path": settings.attn_out_path})
        counts = {"num_mean_prompts": settings.num_mean_prompts, "num_aie_prompts": settings.num_aie_prompts}
        if any(v is not None for v in counts.values()):  # keys made before these counts existed stay valid
            parts.append(counts)
    return hashlib.sha256(json.dumps(parts, default=str).encode()).hexdigest()[:24]


def read_choice(path: Path, num_blocks: int, valid: Callable[[dict], bool] | None = None) -> dict | None:
    """A cached choice (or what ``valid`` accepts), or None (with a warning) for anything that is not one for a
    model of this depth."""
    try:
        choice = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        log.warning("layer cache %s is unreadable (%s): sweeping again", path, err)
        return None
    if valid is not None:
        if isinstance(choice, dict) and valid(choice):
            return choice
        log.warning("layer cache %s does not hold a valid entry for this model: computing it again", path)
        return None
    if not valid_choice(choice, num_blocks):
        log.warning(
            "layer cache %s does not hold a layer choice for a model of %d blocks: sweeping again", path, num_blocks
        )
        return None
    return choice


def valid_choice(choice, num_blocks: int) -> bool:
    """Everything select_layer, log_choice and layer_of_document read from a choice is there, of its type."""

    def number(value) -> bool:
        return type(value) in (int, float)

    def valid_part(part) -> bool:
        if not isinstance(part, dict):
            return False
        layer, curve = part.get("layer"), part.get("dev_accuracy")
        return (
            type(layer) is int
            and 0 <= layer < num_blocks
            and isinstance(curve, list)
            and len(curve) == num_blocks
            and all(map(number, curve))
            and all(number(part.get(k)) for k in ("baseline_accuracy", "regular_accuracy", "p_value"))
            and type(part.get("no_effect")) is bool
            and type(part.get("num_dev")) is int
        )

    def valid_scores(part) -> bool:  # a choice made by the references' log-likelihood has its scores too
        if part.get("criterion") != REFERENCE_LOGLIKELIHOOD:
            return True
        curve = part.get("dev_score")
        return (
            isinstance(curve, list)
            and len(curve) == num_blocks
            and all(map(number, curve))
            and all(number(part.get(k)) for k in ("baseline_score", "regular_score"))
        )

    if not valid_part(choice) or not valid_scores(choice) or not isinstance(choice.get("dev_split"), str):
        return False
    folds = choice.get("folds")
    return folds is None or (
        isinstance(folds, list)
        and len(folds) == 2
        and all(map(valid_part, folds))
        and all(map(valid_scores, folds))
        and [type(f.get("scored_fold")) for f in folds] == [int, int]
        and sorted(f["scored_fold"] for f in folds) == [0, 1]
        and type(choice.get("num_docs")) is int
        and type(choice.get("fold_seed")) is int
    )


def write_choice(path: Path, choice: dict, warn_once: Callable[[str], None]) -> None:
    """Atomic: a temporary file of its own renamed into place, so concurrent writers and readers never see
    half a file. An unwritable cache keeps the choice in memory and says so."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
        with os.fdopen(handle, "w") as file:
            json.dump({k: v for k, v in choice.items() if k != "source"}, file)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as err:
        if tmp is not None:
            with suppress(OSError):
                os.unlink(tmp)
        warn_once(
            f"layer cache {path.parent} is not writable ({err}): layer choices stay in memory for this "
            "process only; set LM_EVAL_TASKVEC_CACHE to a writable folder"
        )
