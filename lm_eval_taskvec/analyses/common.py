"""What every analysis shares: the model and tasks from the command's options, the layer per task, θ for many
seeded demonstration sets (through :mod:`lm_eval_taskvec.theta`, never a second extraction), and the output
files (a table as .md and .csv, a .json, a PNG)."""

from __future__ import annotations

import csv
import importlib
import json
import random
from pathlib import Path

import torch
from lm_eval.tasks import TaskManager
from lm_eval.utils import simple_parse_args_string

from lm_eval_taskvec._autoload import record_prompt_settings
from lm_eval_taskvec.comparison.render import csv_number
from lm_eval_taskvec.layers import resolve_layer
from lm_eval_taskvec.model import TaskVectorLM
from lm_eval_taskvec.selection import function_vector, function_vector_of, select_layer
from lm_eval_taskvec.settings import AUTO, parse_layer
from lm_eval_taskvec.theta import few_shot_requests, task_vectors


def require(module: str, extra: str = "analyses"):
    """Import an optional dependency, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"this analysis needs {module.split('.')[0]}: pip install 'lm-eval-taskvec[{extra}]'"
        ) from None


def open_model(model_args: str = "pretrained=embedded", batch_size="8", device: str | None = None, method=None):
    """An hf-taskvec model in hypothesis mode (θ needs it) from lm_eval-style ``--model_args`` (and ``--method``)."""
    args = simple_parse_args_string(model_args)
    if method and "method" in args:
        raise ValueError(f"--method {method} and --model_args method={args['method']}: give the method once")
    args |= {"method": method} if method else {}
    for name in ("mode", "layer"):
        if name in args:
            raise ValueError(
                f"--model_args {name}={args[name]} has no meaning here: analyses run θ in hypothesis "
                "mode and take the layer from --layer (auto, a block index or a fraction of depth)"
            )
    return TaskVectorLM(mode="hypothesis", batch_size=batch_size, **({"device": device} if device else {}), **args)


def load_tasks(names, include_path: str | None = None, lm=None, chat: dict | None = None) -> dict:
    """lm-eval's task objects for task or group names (a comma-separated string or a list), by name; with
    ``chat`` (``apply_chat_template``, ``fewshot_as_multiturn``) their prompts are rendered by ``lm``'s template."""
    names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
    names = [n for n in names if n]
    if not names:
        raise ValueError("--tasks is empty: name tasks or groups, e.g. --tasks tv_algorithmic,tv_en_es")
    try:
        tasks = TaskManager(include_path=include_path).load(names)["tasks"]
    except KeyError as err:
        raise ValueError(f"--tasks: {err.args[0]}; `lm-eval ls tasks` lists them") from None
    if chat and chat.get("apply_chat_template"):
        for task in tasks.values():
            record_prompt_settings(task, chat | {"apply_chat_template": True}, lm.apply_chat_template)
    return tasks


def block_of(lm, task_name: str, layer) -> int:
    """Block index for ``--layer``: ``auto`` is hf-taskvec's cached (or freshly swept) choice for the task."""
    value = parse_layer(layer, "--layer")
    return select_layer(lm, task_name)["layer"] if value == AUTO else resolve_layer(value, len(lm.blocks))


def demonstration_sets(task, num_sets: int, num_fewshot: int, seed: int) -> list:
    """One lm-eval request per demonstration set: ``num_sets`` documents drawn with ``seed`` from the task's
    evaluated documents (cycled, with fresh demonstrations, when there are fewer), each with its own seeded
    ``num_fewshot`` demonstrations, which never include the document itself."""
    if num_sets < 1 or num_fewshot < 1:
        raise ValueError(
            f"need at least one demonstration set of at least one demonstration, got "
            f"--num_sets {num_sets} and --num_fewshot {num_fewshot}"
        )
    docs = list(enumerate(task.eval_docs))
    picked = random.Random(seed).sample(docs, min(num_sets, len(docs)))
    picked = [picked[i % len(picked)] for i in range(num_sets)]
    return [requests[0] for requests in few_shot_requests(task, picked, num_fewshot, seed)]


def theta_sets(lm, task, layers: list[int], num_sets: int, num_fewshot: int, seed: int) -> torch.Tensor:
    """θ of each demonstration set at each of ``layers``: Tensor[len(layers), num_sets, hidden], one pass."""
    return task_vectors(lm, demonstration_sets(task, num_sets, num_fewshot, seed), layers)


def function_vectors(lm, name: str, task, blocks: list[int], num_fewshot: int | None) -> tuple[torch.Tensor, dict]:
    """method=function_vector: the task's one function vector at each of ``blocks``, Tensor[len(blocks),
    hidden], and its record (heads and prompts). It is ranked and averaged on the task's dev prompts with the
    task's own demonstrations, so another ``num_fewshot`` is refused rather than ignored."""
    shots = task.get_config("num_fewshot")
    if num_fewshot is not None and num_fewshot != shots:
        raise ValueError(
            f"--num_fewshot {num_fewshot}: task {name!r}'s function vector is ranked and averaged on its dev "
            f"prompts with the task's own {shots} demonstrations: leave out --num_fewshot for method=function_vector"
        )
    key, record = function_vector_of(lm, name)
    recorded = {k: record[k] for k in function_vector.RECORDED if k in record}
    return torch.stack([lm.thetas.get(block, key) for block in blocks]), recorded


def num_fewshot_of(task, num_fewshot: int | None) -> int:
    """``num_fewshot`` if given, else the task's own setting."""
    return num_fewshot if num_fewshot is not None else task.get_config("num_fewshot") or 0


def write_table(rows: list[dict], stem: Path) -> str:
    """Write ``rows`` as ``stem``.csv (floats to 4 decimals, or 4 significant digits where that keeps more; an
    analysis's .json keeps every digit) and ``stem``.md (3 decimals); return the markdown."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    header = list(rows[0])
    with open(stem.with_suffix(".csv"), "w", newline="") as file:
        writer = csv.DictWriter(file, header)
        writer.writeheader()
        writer.writerows({k: csv_number(v) if isinstance(v, float) else v for k, v in row.items()} for row in rows)

    def cell(value) -> str:
        text = f"{value:.3f}" if isinstance(value, float) else str(value)
        return text.replace("|", "\\|").replace("\n", "\\n")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(row[key]) for key in header) + " |" for row in rows]
    text = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(text)
    return text


def write_json(data, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, ensure_ascii=False))
