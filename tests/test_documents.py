"""Every request maps to its true document: under --samples lm-eval renumbers Instance.doc_id by position
among the sampled documents, and a cross-fitted task must still patch each document at its own half's block."""

from __future__ import annotations

import torch

from lm_eval_taskvec.planning import document_index
from lm_eval_taskvec.selection import sweep
from lm_eval_taskvec.selection.dev import dev_sets, fold_members
from tests.tasks import letter_rows, make_task


def test_samples_patch_each_document_at_the_block_chosen_on_the_half_without_it(make_lm, monkeypatch, tmp_path):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path))
    rows = letter_rows(24)
    task = make_task(splits={"test": rows}, fewshot_split="test")  # no dev split: cross-fitted halves
    task.set_fewshot_seed(1234)
    task.build_all_requests(limit=None, rank=0, world_size=1)  # the task as lm-eval loads it
    lm = make_lm("llama", mode="hypothesis", num_dev=8, layer_cache="off")
    fake = iter([[0, 1, 0], [2, 0, 0]])  # half 0's dev set picks block 1, half 1's block 0
    monkeypatch.setattr(
        sweep,
        "score",
        lambda lm, name, sets: [
            (
                torch.tensor([next(fake)] * 8).T.bool(),
                torch.zeros(8, dtype=torch.bool),
                torch.zeros(8, dtype=torch.bool),
            )
            for _ in sets
        ],
    )
    halves = fold_members(len(rows), lm.settings.seed)
    samples = [3, 5, 8, 13, 17, 22]
    assert {i in halves[0] for i in samples} == {True, False}  # both halves sampled
    task.build_all_requests(samples=samples, rank=0, world_size=1)
    requests = list(task.instances)
    assert [r.doc_id for r in requests] == list(range(len(samples)))  # lm-eval's renumbering, which we undo
    assert [r.doc["input"] for r in requests] == [rows[i]["input"] for i in samples]
    assert [document_index(r) for r in requests] == samples
    assert len(dev_sets(lm.settings, "tiny")) == 2
    plans = lm.plan(requests)
    assert [p.layer for p in plans] == [1 if i in halves[0] else 0 for i in samples]
