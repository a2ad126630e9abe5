"""Models spread or offloaded by accelerate (``parallelize=True``): every mode and layer=auto run, and give the
answers of the same model held whole on one device."""

from __future__ import annotations

import pytest

from lm_eval_taskvec.identity import weights_fingerprint
from lm_eval_taskvec.model import TaskVectorLM
from tests.tasks import make_task, requests_of


@pytest.fixture
def offloaded(saved_model, tmp_path):
    """The tiny Llama with every weight offloaded to disk: its parameters are ``meta`` until a block runs."""

    def build(**kwargs):
        lm = TaskVectorLM(
            pretrained=str(saved_model()),
            parallelize=True,
            max_cpu_memory=60_000,
            offload_folder=str(tmp_path / "offload"),
            device="cpu",
            batch_size=4,
            **kwargs,
        )
        assert all(p.device.type == "meta" for p in lm.model.parameters())  # really offloaded
        return lm

    return build


@pytest.mark.parametrize("kind", ["generate_until", "loglikelihood"])
@pytest.mark.parametrize("mode", ["regular", "hypothesis", "baseline"])
def test_every_mode_of_an_offloaded_model_answers_as_the_whole_model(saved_model, offloaded, mode, kind):
    task = (
        make_task()
        if kind == "generate_until"
        else make_task(output_type="multiple_choice", doc_to_choice="{{[answers[0], input, 'zz']}}", doc_to_target=0)
    )
    requests = requests_of(task, limit=6)
    whole = TaskVectorLM(pretrained=str(saved_model()), device="cpu", batch_size=4, mode=mode, layer=1)
    assert getattr(offloaded(mode=mode, layer=1), kind)(requests) == getattr(whole, kind)(requests)


def test_layer_auto_sweeps_an_offloaded_model_as_the_whole_model(saved_model, offloaded, monkeypatch, tmp_path):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    requests = requests_of(make_task(), limit=6)
    lm = offloaded(mode="hypothesis", num_dev=6, layer_cache="off")
    whole = TaskVectorLM(
        pretrained=str(saved_model()), device="cpu", batch_size=4, mode="hypothesis", num_dev=6, layer_cache="off"
    )
    assert weights_fingerprint(lm.model) == weights_fingerprint(whole.model)  # read through the offload hooks
    assert lm.generate_until(requests) == whole.generate_until(requests)
    assert lm.layer_choices["tiny"]["dev_accuracy"] == whole.layer_choices["tiny"]["dev_accuracy"]
