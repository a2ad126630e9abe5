"""Reading what ``lm_eval --output_path`` wrote: results JSONs and, when logged, their samples files."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

# Model arguments that change how fast a run is, not what it computes: they never split a column.
RUNTIME_ARGS = {"device", "batch_size", "max_batch_size", "parallelize", "trust_remote_code"}
TASKVEC = "hf-taskvec"


class UsageError(ValueError):
    """An argument of ``compare`` that cannot work; the message names it and the fix."""


class ResultsPathError(UsageError):
    """A path given as RESULTS that is not an lm-eval results file or a folder holding some."""


@dataclass
class Run:
    """One results file: one model, one set of settings, one or more tasks."""

    path: Path
    data: dict
    _samples: dict = field(default_factory=dict, repr=False)

    @property
    def config(self) -> dict:
        return self.data.get("config") or {}

    @cached_property
    def model_args(self) -> dict:
        args = self.config.get("model_args")
        if isinstance(args, str):
            from lm_eval.utils import simple_parse_args_string

            return simple_parse_args_string(args)
        return dict(args or {})

    @property
    def model_type(self) -> str:
        """``hf``, ``hf-taskvec``, ``steered``, ``vllm``...: the registry name the run was made with."""
        if "taskvec" in self.config:
            return TASKVEC
        source = self.data.get("model_source")
        if source == "CUSTOM":  # simple_evaluate(model=<LM object>): config.model is the weights' path
            return "custom"
        return str(source or self.config.get("model") or "?")

    @property
    def model_name(self) -> str:
        for key in ("pretrained", "model", "path", "engine"):
            if key in self.model_args:
                return str(self.model_args[key])
        return str(self.data.get("model_name") or self.config.get("model") or "?")

    @property
    def taskvec(self) -> dict:
        """``config.taskvec`` of hf-taskvec runs; {} for other models. Read defensively: fields may be added."""
        info = self.config.get("taskvec")
        return info if isinstance(info, dict) else {}

    @property
    def mode(self) -> str | None:
        if self.model_type != TASKVEC:
            return None
        return str(self.taskvec.get("mode") or self.model_args.get("mode") or "regular")

    def layers(self, task: str) -> list[int]:
        """The blocks θ was patched at for ``task`` (hypothesis runs): layer=auto's choice (one per cross-fitted
        half: each half's documents were patched at the block chosen on the other), or the fixed layer."""
        if self.mode != "hypothesis":
            return []
        choice = (self.taskvec.get("layer_selection") or {}).get(task)
        if isinstance(choice, dict):
            parts = choice.get("folds") if isinstance(choice.get("folds"), list) else [choice]
            found = [p.get("layer") for p in parts if isinstance(p, dict)]
            if found and all(type(layer) is int for layer in found):
                return sorted(set(found))
        fixed = self.taskvec.get("layer")
        return [fixed] if type(fixed) is int else []

    @property
    def limit(self):
        return self.config.get("limit")

    @property
    def settings(self) -> dict:
        """What must be equal for two runs to share a column (besides covering different tasks)."""
        args = {k: v for k, v in self.model_args.items() if k not in RUNTIME_ARGS}
        return {
            "model_type": self.model_type,
            "model_args": args,
            "limit": self.limit,
            "gen_kwargs": self.config.get("gen_kwargs") or {},
            "fewshot_seed": self.config.get("fewshot_seed"),
        }

    @property
    def results(self) -> dict:
        return self.data["results"]

    def task_info(self, task: str) -> dict:
        """Per-task settings compared across columns: a difference is flagged in a footnote."""
        config = (self.data.get("configs") or {}).get(task) or {}
        n = (self.data.get("n-samples") or {}).get(task) or {}
        return {
            "version": _version((self.data.get("versions") or {}).get(task)),
            "n-shot": (self.data.get("n-shot") or {}).get(task),
            "n": n.get("effective"),
            "generation_kwargs": config.get("generation_kwargs"),
        }

    def samples(self, task: str) -> list[dict] | None:
        """The logged samples of ``task`` (``--log_samples``), or None when the run did not log them."""
        if task not in self._samples:
            path = self.samples_path(task)
            self._samples[task] = None if path is None else _read_jsonl(path)
        return self._samples[task]

    def samples_path(self, task: str) -> Path | None:
        """lm-eval names samples ``samples_<task>_<date>.jsonl`` next to ``results_<date>.json``."""
        date = self.path.stem.rsplit("_", 1)[-1]
        path = self.path.parent / f"samples_{task}_{date}.jsonl"
        return path if path.is_file() else None


def _version(value) -> str | None:
    """Group versions are written as strings ("1.0"), task versions as numbers (1.0)."""
    if value is None:
        return None
    try:
        return str(float(value))
    except (TypeError, ValueError):
        return str(value)


def _read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load_runs(paths) -> list[Run]:
    """Every results file among ``paths`` (files, or folders searched for ``results_*.json``), in order."""
    runs = []
    for given in [paths] if isinstance(paths, (str, Path)) else paths:
        path = Path(given)
        if path.is_dir():
            files = sorted(path.rglob("results_*.json"))
            if not files:
                raise ResultsPathError(
                    f"RESULTS {given}: no lm-eval results file (results_*.json) under this folder; pass the "
                    "--output_path folder of an lm_eval run, or a results JSON file"
                )
            runs += [load_run(f) for f in files]
        elif path.is_file():
            runs.append(load_run(path))
        else:
            raise ResultsPathError(f"RESULTS {given}: no such file or folder")
    return runs


def load_run(path: Path) -> Run:
    """One results JSON, checked to be lm-eval's layout (``results`` per task, ``config`` of the run)."""
    hint = (
        "pass a results_<date>.json written by lm_eval --output_path (samples files are found next to it), "
        "or the folder holding it"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultsPathError(f"RESULTS {path}: not an lm-eval results file (not JSON: {e}); {hint}") from None
    if not (isinstance(data, dict) and isinstance(data.get("results"), dict) and isinstance(data.get("config"), dict)):
        raise ResultsPathError(
            f"RESULTS {path}: not an lm-eval results file (no 'results' and 'config' objects); {hint}"
        )
    if not data["results"]:
        raise ResultsPathError(f"RESULTS {path}: the results file holds no task results; {hint}")
    return Run(path, data)
