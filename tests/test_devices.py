"""Past one float32 model on one CPU: models spread or offloaded by accelerate (``parallelize=True``) answer as
the same model held whole, and the patching invariants hold in half precision as in float32."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from lm_eval.api.instance import Instance

import lm_eval_taskvec.layers as layers_module
from lm_eval_taskvec import extraction
from lm_eval_taskvec.identity import weights_fingerprint
from lm_eval_taskvec.layers import Intervention, intervene, read_last_states, write_states
from lm_eval_taskvec.model import TaskVectorLM
from tests.helpers import make_model
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


# ---------------------------------------------------------------------------------------------- dtypes
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture
def lm_in(tokenizer):
    """hf-taskvec around a tiny random model cast to ``dtype`` (its own copy: the session's models stay float32)."""

    def build(arch: str, dtype: torch.dtype, **kwargs):
        model = make_model(arch, len(tokenizer)).to(dtype)
        kwargs.setdefault("fewshot_delimiter", "\n")
        return TaskVectorLM(pretrained=model, tokenizer=tokenizer, device="cpu", batch_size=4, **kwargs)

    return build


def _rows(lm, texts):
    """Right-padded token rows, as HFLM's loglikelihood batches them, and each row's length."""
    encoded = [lm.tok_encode(t) for t in texts]
    ids = torch.zeros(len(encoded), max(map(len, encoded)), dtype=torch.long)
    for r, tokens in enumerate(encoded):
        ids[r, : len(tokens)] = torch.tensor(tokens)
    return ids, [len(t) for t in encoded]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_writing_a_runs_own_state_back_changes_nothing_in_any_dtype(lm_in, arch, dtype):
    """Block L's own output at the last token, read from the very pass it is written into: bit for bit the
    same logits, in float32 and in half precision alike."""
    lm = lm_in(arch, dtype)
    ids, lengths = _rows(lm, ["example:a->A\nexample:b->", "example:abc->ABC\nexample:d->"])
    last = torch.tensor(lengths) - 1
    for layer in range(len(lm.blocks)):
        with read_last_states(lm.blocks, [layer], last) as found:
            base = lm._model_call(ids)
        assert found[layer].dtype == dtype
        with intervene(lm.blocks, [Intervention(found[layer][r], layer) for r in range(len(lengths))], last):
            patched = lm._model_call(ids)
        assert torch.equal(patched, base), layer


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", ["replace", "add"])
def test_a_patch_touches_only_its_row_and_the_positions_from_its_own_on_in_any_dtype(lm_in, dtype, op):
    lm = lm_in("llama", dtype)
    ids, lengths = _rows(lm, ["example:abcde->ABCDE\nexample:k->", "example:ab->AB\nexample:c->"])
    base = lm._model_call(ids)
    vector = torch.randn(lm.model.config.hidden_size, generator=torch.Generator().manual_seed(0)) * 4
    with intervene(lm.blocks, [Intervention(vector, 1, op), None], torch.tensor([3, 0])):
        out = lm._model_call(ids)
    assert torch.equal(out[1], base[1])  # the other row
    assert torch.equal(out[0, :3], base[0, :3])  # causal: the positions before the patch
    assert not torch.allclose(out[0, 3], base[0, 3], atol=1e-2)  # the patch did something


def test_an_added_vector_at_scale_zero_is_the_unpatched_run(lm_in):
    lm = lm_in("llama", torch.bfloat16)
    ids, _ = _rows(lm, ["example:abc->ABC\nexample:d->"])
    base = lm._model_call(ids)
    with intervene(lm.blocks, [Intervention(torch.randn(lm.model.config.hidden_size), 1, "add", 0.0)], -1):
        assert torch.equal(lm._model_call(ids), base)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_hypothesis_generation_patches_the_prompt_pass_only_in_any_dtype(lm_in, dtype, monkeypatch):
    """θ is kept in the model's dtype; generation equals stock HFLM with θ written by hand into the prompt's
    pass (first call only), and the block's decode steps run unpatched."""
    from lm_eval.models.huggingface import HFLM

    lm = lm_in("gpt2", dtype, mode="hypothesis", layer=1)
    requests = requests_of(make_task(), limit=6)
    plans = lm.plan(requests)
    assert {lm.thetas.get(p.layer, p.theta_key).dtype for p in plans} == {dtype}
    records = []
    write = layers_module.write_states

    @contextlib.contextmanager
    def spy(*args, **kwargs):
        with write(*args, **kwargs) as record:
            records.append(record)
            yield record

    monkeypatch.setattr(layers_module, "write_states", spy)
    outputs = lm.generate_until(requests)
    monkeypatch.undo()
    assert records and all(r.patched == 1 and r.calls > 1 for r in records)  # decode steps ran, unpatched
    stock = HFLM(pretrained=lm.model, tokenizer=lm.tokenizer, device="cpu", batch_size=1)
    for request, plan, output in zip(requests, plans, outputs):
        theta = lm.thetas.get(plan.layer, plan.theta_key)
        alone = Instance("generate_until", {}, (plan.query, request.args[1]), 0, ("t", 0, 1))
        with write_states(lm.blocks[1], theta[None], -1, first_call_only=True):
            assert stock.generate_until([alone]) == [output]


def test_the_branch_mask_check_accepts_rounding_and_refuses_a_misread_mask_in_half_precision(
    lm_in, monkeypatch, caplog
):
    """In half precision a branch is accepted when it is as close to one pass per row as a plain KV-cached
    continuation (float16 under SDPA: both a few units in the last place off); a model that misreads the 4D
    mask (here: attends everywhere) is refused, and the log says why."""
    model = lm_in("llama", torch.bfloat16).model
    monkeypatch.setattr(extraction, "_branch_check", lambda model, kind: (0.074, 0.074))
    assert extraction.branch_mask_kind(model) == "bool"
    del model._taskvec_branch_mask
    monkeypatch.undo()
    forward = model.forward
    monkeypatch.setattr(
        model,
        "forward",
        lambda *a, attention_mask=None, **k: forward(
            *a,
            attention_mask=attention_mask
            if attention_mask is None or attention_mask.dim() < 4
            else torch.ones_like(attention_mask),
            **k,
        ),
    )
    with caplog.at_level(logging.WARNING, logger="lm_eval.taskvec"):
        assert extraction.branch_mask_kind(model) is None
    assert "bfloat16, sdpa attention): branches under a 4D mask give logits" in caplog.text


@pytest.mark.slow
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_smollm2_in_half_precision_keeps_the_branch_mask(dtype):
    """The real case: SmolLM2 in float16 under SDPA misses the old fixed tolerance by rounding alone."""
    from transformers import AutoModelForCausalLM

    from lm_eval_taskvec.embedded import embedded_model_path

    pytest.importorskip("gguf")
    model = AutoModelForCausalLM.from_pretrained(embedded_model_path(), dtype=dtype).eval()
    assert extraction.branch_mask_kind(model) == "bool"
