"""What a run says: layer=auto announces the sweep's cost, explains NO EFFECT by what was tested, and reports
a cross-fitted task's halves and their pooled record as the choice records them."""

from __future__ import annotations

import logging

import pytest
import torch

from lm_eval_taskvec import selection
from lm_eval_taskvec.selection import sweep
from lm_eval_taskvec.stats import mcnemar_exact
from tests.tasks import make_task, requests_of


def fake_sweep(monkeypatch, layer_hits, baseline):
    """Every dev set scores these hits (blocks x prompts) and baseline hits; regular as the baseline."""
    monkeypatch.setattr(sweep, "score", lambda lm, name, sets: [(layer_hits, baseline, baseline) for _ in sets])


@pytest.fixture
def tiny_task(monkeypatch, tmp_path):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))
    task = make_task()
    requests_of(task, limit=1)
    return task


def test_the_sweep_says_what_it_will_score_before_it_runs(make_lm, tiny_task, monkeypatch, caplog):
    lm = make_lm("gpt2", mode="hypothesis", num_dev=7, layer_cache="off")
    said = []
    fake_sweep(monkeypatch, torch.zeros(3, 7, dtype=torch.bool), torch.zeros(7, dtype=torch.bool))
    monkeypatch.setattr(sweep, "choose", lambda *a, _f=sweep.choose: said.append(caplog.text) or _f(*a))
    with caplog.at_level(logging.INFO, logger="lm_eval.taskvec"):
        selection.select_layer(lm, "tiny")
    before = said[0]  # logged before the sweep started
    assert "tiny: layer=auto sweeps 3 blocks on 7 dev prompts from validation (model arg num_dev=7" in before
    assert "--limit bounds only the scored documents" in before


@pytest.mark.parametrize("num_dev", [5, 6])
def test_too_few_dev_prompts_to_ever_be_significant_are_warned_about(make_lm, tiny_task, monkeypatch, caplog, num_dev):
    """All dev prompts right at block 0, all wrong alone: the strongest possible evidence. Below 6 prompts the
    exact McNemar test still cannot reject (p = 2 / 2^n), and the log says so instead of a bare NO EFFECT."""
    assert (mcnemar_exact(num_dev, 0) < 0.05) == (num_dev >= 6)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=num_dev, layer_cache="off")
    hits = torch.zeros(3, num_dev, dtype=torch.bool)
    hits[0] = True
    fake_sweep(monkeypatch, hits, torch.zeros(num_dev, dtype=torch.bool))
    with caplog.at_level(logging.INFO, logger="lm_eval.taskvec"):
        choice = selection.select_layer(lm, "tiny")
    assert choice["no_effect"] == (num_dev < 6)
    warned = "can never reach p < 0.05" in caplog.text
    too_few = f"on {num_dev} dev prompts: too few to tell: p < 0.05 needs at least 6 dev prompts" in caplog.text
    assert warned == too_few == (num_dev < 6)
    assert ("NO EFFECT" in caplog.text) == (num_dev < 6)


def test_no_effect_says_whether_no_block_beat_the_query_alone_or_the_gain_was_not_significant(
    make_lm, tiny_task, monkeypatch, caplog
):
    lm = make_lm("gpt2", mode="hypothesis", num_dev=20, layer_cache="off")
    baseline = torch.tensor([True] * 10 + [False] * 10)
    fake_sweep(monkeypatch, torch.stack([baseline] * 3), baseline)
    with caplog.at_level(logging.INFO, logger="lm_eval.taskvec"):
        selection.select_layer(lm, "tiny")
    assert "NO EFFECT: no block beats the query alone" in caplog.text
    caplog.clear()
    gained = baseline.clone()
    gained[10:12] = True  # two more right at every block: 2 gained, 0 lost, p = 0.5
    fake_sweep(monkeypatch, torch.stack([gained] * 3), baseline)
    other = make_lm("gpt2", mode="hypothesis", num_dev=20, layer_cache="off", seed=5)  # another dev set, no memory
    with caplog.at_level(logging.INFO, logger="lm_eval.taskvec"):
        selection.select_layer(other, "tiny")
    assert "not significant at p < 0.05 (exact McNemar p=0.50 on 20 dev prompts: the gain may be chance)" in caplog.text


def test_a_cross_fitted_task_logs_each_half_and_the_pooled_record_with_the_choices_own_flags(
    make_lm, monkeypatch, tmp_path, caplog
):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))
    task = make_task(splits={"test": make_task().dataset["test"].to_list()}, fewshot_split="test")
    requests_of(task, limit=1)
    lm = make_lm("gpt2", mode="hypothesis", num_dev=12, layer_cache="off")
    halves = iter([torch.tensor([True] * 12), torch.tensor([True] * 2 + [False] * 10)])  # half 0 gains, half 1 not
    baseline = torch.zeros(12, dtype=torch.bool)
    monkeypatch.setattr(
        sweep, "score", lambda lm, name, sets: [(torch.stack([next(halves)] * 3), baseline, baseline) for _ in sets]
    )
    with caplog.at_level(logging.INFO, logger="lm_eval.taskvec"):
        choice = selection.select_layer(lm, "tiny")
    lines = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("tiny") and "block 0" in r.getMessage()
    ]
    flags = [fold["no_effect"] for fold in choice["folds"]] + [choice["no_effect"]]
    assert flags == [False, True, False]
    assert [("NO EFFECT" in line) for line in lines] == flags
    assert [line.split(":")[0] for line in lines] == [
        "tiny half 0",
        "tiny half 1",
        "tiny (both halves pooled, for the record",
    ]


def test_the_lm_eval_command_gets_a_line_under_its_table_saying_which_metric_to_read(make_lm, monkeypatch):
    import atexit

    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec import model as model_module
    from lm_eval_taskvec._autoload import LOADED_TASKS
    from lm_eval_taskvec.tasks import task_dir

    saved = dict(LOADED_TASKS)  # the process's record of loaded tasks, restored below
    try:
        LOADED_TASKS.clear()
        assert model_module.reading_note("hypothesis") is None  # no task with the paper's metric: nothing to say
        TaskManager(include_path=str(task_dir()), include_defaults=False).load(["tv_letter_to_upper"])
        note = model_module.reading_note("hypothesis")
        assert note.startswith("hf-taskvec mode=hypothesis: read paper_match for tv_letter_to_upper, the paper's")
    finally:
        LOADED_TASKS.clear()
        LOADED_TASKS.update(saved)
    registered = []
    monkeypatch.setattr(atexit, "register", lambda *a: registered.append(a))
    monkeypatch.setattr(model_module.sys, "argv", ["/usr/bin/lm_eval", "--model", "hf-taskvec"])
    make_lm(mode="hypothesis", layer=1)
    make_lm(mode="regular")  # regular reads exact_match as well as the paper's score: no note
    monkeypatch.setattr(model_module.sys, "argv", ["/usr/bin/python", "script.py"])
    make_lm(mode="baseline")  # the Python API prints no table
    assert registered == [(model_module._print_reading_note, "hypothesis")]
