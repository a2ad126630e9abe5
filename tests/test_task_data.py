"""The 18 task-vector tasks: data files, prompt format, few-shot sampling, groups and metrics."""

import importlib.util
import random
import re
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = ROOT / "task_configs"


def _import(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _import("build_tasks", ROOT / "scripts" / "build_tasks.py")
utils = _import("tv_utils", CONFIGS / "utils.py")
WORD_TASKS = [t for c, ts in build.CATEGORIES.items() if c != "tv_algorithmic" for t in ts]


@pytest.fixture(scope="module")
def loaded():
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(CONFIGS), include_defaults=False).load(["task_vectors"])


def test_build_check_passes(capsys):
    assert build.main(["--check"]) == 0, capsys.readouterr().err


def test_validate_catches_bad_rows():
    rows = build.assign_splits("tv_antonyms", [{"input": f"w{i}", "answers": [f"a{i}"]} for i in range(150)])
    assert build.validate("tv_antonyms", rows) == []
    bad = [dict(r) for r in rows]
    bad[0]["answers"] = [" a0"]
    bad[1]["input"] = bad[2]["input"]
    bad[3]["answers"] = []
    problems = build.validate("tv_antonyms", bad)
    assert any("stripped" in p for p in problems)
    assert any("duplicate inputs" in p or "share inputs" in p for p in problems)
    assert any("non-empty list" in p for p in problems)
    assert any("distinct inputs" in p for p in build.validate("tv_antonyms", rows[:100]))


def test_splits_are_deterministic_and_order_free():
    rows = [{"input": f"w{i}", "answers": ["x"]} for i in range(200)]
    a = {r["input"]: r["split"] for r in build.assign_splits("tv_fr_en", rows)}
    b = {r["input"]: r["split"] for r in build.assign_splits("tv_fr_en", rows[::-1])}
    assert a == b
    assert [list(a.values()).count(s) for s in build.SPLITS] == [80, 40, 80]


def test_groups(loaded):
    groups = loaded["groups"]
    assert set(groups) == {"task_vectors", *build.CATEGORIES}
    assert sorted(t.task_name for t in groups["task_vectors"].get_all_tasks()) == sorted(build.TASKS)
    assert len(build.TASKS) == 18
    for name, tasks in build.CATEGORIES.items():
        assert sorted(t.task_name for t in groups[name].get_all_tasks()) == sorted(tasks)


def test_task_vectors_mean_is_over_the_18_tasks(loaded):
    """Not a mean of the 4 category means (6 algorithmic tasks would count less)."""
    metrics = {
        t: {"exact_match,none": float(t in build.CATEGORIES["tv_algorithmic"]), "sample_len": 1 + i}
        for i, t in enumerate(build.TASKS)
    }
    result = loaded["groups"]["task_vectors"].aggregate(metrics)
    assert result["exact_match,none"] == pytest.approx(6 / 18)


def _splits(task):
    return {s: list(task.dataset[s]["input"]) for s in build.SPLITS}


@pytest.mark.parametrize("name", build.TASKS)
def test_splits_disjoint(loaded, name):
    splits = _splits(loaded["tasks"][name])
    assert all(len(set(xs)) == len(xs) > 0 for xs in splits.values())
    if name in build.LETTER_TASKS:
        assert set(splits["train"]) == set(splits["validation"]) == set(splits["test"])
    else:
        assert not set(splits["train"]) & set(splits["validation"])
        assert not set(splits["train"]) & set(splits["test"])
        assert not set(splits["validation"]) & set(splits["test"])


@pytest.mark.parametrize("name", build.TASKS)
def test_prompt_format(loaded, name):
    """Paper format; demos come from the few-shot split and never show the query's own item."""
    task = loaded["tasks"][name]
    task.set_fewshot_seed(1234)
    sp = " " if name in WORD_TASKS else ""
    fewshot = task.dataset[task.config.fewshot_split]
    demo_lines = {f"example:{sp}{x}->{sp}{a[0]}": x for x, a in zip(fewshot["input"], fewshot["answers"])}
    docs = list(task.test_docs())
    if name not in build.LETTER_TASKS:  # letters: every doc; the rest: a sample keeps this fast
        docs = random.Random(0).sample(docs, 25)
        assert task.config.fewshot_split == "train"
    for doc in docs:
        ctx = task.fewshot_context(doc, 5)
        *demos, query = ctx.split("\n")
        assert query == f"example:{sp}{doc['input']}->" and ctx.endswith("->")
        assert len(demos) == 5 and all(d in demo_lines for d in demos), ctx
        shown = [demo_lines[d] for d in demos]
        assert len(set(shown)) == 5 and doc["input"] not in shown, ctx
    if name in WORD_TASKS:
        assert re.fullmatch(r"example: \S.*-> \S.*", demos[0])


def test_generation_settings(loaded):
    for task in loaded["tasks"].values():
        assert task.config.generation_kwargs["until"] == ["\n"]
        assert task.config.generation_kwargs["do_sample"] is False
        assert task.config.description == "" and task.config.fewshot_delimiter == "\n"


@pytest.mark.parametrize(
    "generation, answers, exact, paper, paper_knowledge",
    [
        ("A", ["A"], 1, 1, 1),
        (" A \nexample:b->B", ["A"], 1, 1, 1),  # cut at the newline, stripped
        ("a", ["A"], 0, 0, 0),
        ("dog", ["cat", "dog"], 1, 1, 1),  # any acceptable answer
        ("dog and cat", ["dog"], 0, 1, 1),  # paper: what follows the answer does not count
        ("C_LOCAL", ["C"], 0, 1, 1),  # hypothesis mode rambles after its first token
        ("Cat", ["C"], 0, 0, 1),  # no word boundary after the answer
        ("New Delhi is", ["New Delhi"], 0, 1, 1),
        ("New", ["New Delhi"], 0, 0, 1),  # knowledge: prediction is a prefix of the answer
        ("Parisian", ["Paris"], 0, 0, 1),  # knowledge: answer is a prefix of the prediction
        ("Lyon", ["Paris"], 0, 0, 0),
        ("", ["Paris"], 0, 0, 0),
        ("\nParis", ["Paris"], 0, 0, 0),  # nothing before the newline
    ],
)
def test_metrics(generation, answers, exact, paper, paper_knowledge):
    doc = {"input": "x", "answers": answers, "task": "tv_country_capital"}
    assert utils.process_results(doc, [generation]) == {"exact_match": exact, "paper_match": paper}
    assert utils.process_results_knowledge(doc, [generation])["paper_match"] == paper_knowledge


@pytest.mark.parametrize(
    "task, generation, answers, paper_knowledge",
    [
        ("tv_location_continent", "A", ["Asia"], 0),  # "A" also starts Africa, Antarctica, Australia
        ("tv_location_continent", "A", ["Africa"], 0),
        ("tv_location_continent", "As", ["Asia"], 1),  # Asia alone starts with "As"
        ("tv_location_continent", "Af", ["Asia"], 0),  # a cut of another answer
        ("tv_location_continent", "North is", ["North America"], 1),
        ("tv_location_continent", "Asian", ["Asia"], 1),  # extends the answer
        ("tv_country_capital", "Port", ["Port Louis"], 0),  # Port Moresby, Port Vila, ...
        ("tv_country_capital", "Asunci", ["Asunción", "Asuncion"], 1),  # spellings of one acceptable answer
        ("tv_country_capital", "Asunci", ["Asunción"], 0),  # "Asuncion" would not be acceptable here
    ],
)
def test_knowledge_prefix_must_identify_one_answer_of_the_task(loaded, task, generation, answers, paper_knowledge):
    doc = {"input": "x", "answers": answers, "task": task}
    assert loaded["tasks"][task].process_results(doc, [generation])["paper_match"] == paper_knowledge


def test_knowledge_prefix_rule_reads_the_answer_set_it_is_given():
    assert utils.paper_match("A", ["Asia"], {"Asia", "Europe"})
    assert not utils.paper_match("A", ["Asia"], {"Asia", "Africa"})
    assert not utils.paper_match("A", ["Asia"])  # no answer set (non-knowledge tasks): no cuts at all


def test_every_document_names_its_task_for_the_answer_set(loaded):
    for name, task in loaded["tasks"].items():
        assert {doc["task"] for doc in task.test_docs()} == {name}
    assert utils.answer_set("tv_location_continent") == {
        "Africa",
        "Antarctica",
        "Asia",
        "Australia",
        "Europe",
        "North America",
        "Oceania",
        "South America",
    }


def test_load_ignores_model_args():
    ds = utils.load(tv_task="tv_letter_to_upper", pretrained="x", layer=3.0, version=1.0)
    assert set(ds) == set(build.SPLITS)
    assert {"input": "a", "answers": ["A"], "task": "tv_letter_to_upper"} in list(ds["test"])


PREFIX = 20  # a typical --limit


def _mix(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Each label as a class index, and the split's share of each class."""
    codes = {label: i for i, label in enumerate(sorted(set(labels)))}
    idx = np.array([codes[label] for label in labels])
    return idx, np.bincount(idx, minlength=len(codes)) / len(idx)


def _distances(samples: np.ndarray, whole: np.ndarray) -> np.ndarray:
    """Total-variation distance between each row's class mix and ``whole``."""
    counts = (samples[..., None] == np.arange(len(whole))).sum(axis=-2)
    return 0.5 * np.abs(counts / samples.shape[-1] - whole).sum(axis=-1)


def label_distance(labels: list[str], n: int = PREFIX) -> float:
    """Total-variation distance between the answer mix of the first ``n`` documents and of the whole split."""
    idx, whole = _mix(labels)
    return float(_distances(idx[:n], whole))


def far_threshold(labels: list[str], n: int = PREFIX, draws: int = 5000) -> float:
    """The 99.9th percentile of ``label_distance`` over uniformly random n-document samples of the split:
    a prefix farther than that is less representative than 999 of 1000 random samples. Shuffled data is
    such a sample; a split sorted by answer lies far beyond (0.6-0.9 against thresholds of 0.3-0.6 here)."""
    idx, whole = _mix(labels)
    orders = np.random.default_rng(0).random((draws, len(idx))).argsort(axis=1)[:, :n]
    return float(np.quantile(_distances(idx[orders], whole), 0.999))


def split_labels(name: str) -> dict[str, list[str]]:
    ds = utils.load(tv_task=name)
    return {s: [answers[0] for answers in ds[s]["answers"]] for s in build.SPLITS}


@pytest.mark.parametrize("name", build.TASKS)
def test_first_20_documents_of_every_split_have_the_splits_answer_mix(name):
    """--limit 20 must score a sample of the split, not one class (sorted data gave 19 x Europe)."""
    for split, labels in split_labels(name).items():
        if len(set(labels)) == len(labels):
            continue  # every answer distinct: every sample is equally far from the mix
        distance, threshold = label_distance(labels), far_threshold(labels)
        assert distance <= threshold, f"{name} {split}: first {PREFIX} docs at TV {distance:.2f} > {threshold:.2f}"


def test_the_answer_mix_check_catches_data_sorted_by_answer():
    for name in ("tv_location_continent", "tv_location_religion", "tv_person_language"):
        labels = sorted(split_labels(name)["test"])
        assert label_distance(labels) > far_threshold(labels), name


def test_every_split_is_stored_shuffled_independently_of_the_source_order():
    rows = [{"input": f"w{i:03d}", "answers": ["AB"[i % 2]]} for i in range(200)]
    built = build.assign_splits("tv_fr_en", rows)
    assert build.assign_splits("tv_fr_en", rows[::-1]) == built
    assert [r["split"] for r in built] == sorted((r["split"] for r in built), key=build.SPLITS.index)
    for split in build.SPLITS:
        inputs = [r["input"] for r in built if r["split"] == split]
        assert inputs != sorted(inputs)
