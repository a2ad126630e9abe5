"""The conftest's guard: what a test leaves behind in the session's models, tokenizer, saved folders or the
package's globals fails that test, and is undone before the next one."""

from __future__ import annotations

import torch

import lm_eval_taskvec.selection.sweep as sweep
from lm_eval_taskvec import identity
from lm_eval_taskvec.extraction import branch_mask_kind


def test_hooks_an_instance_forward_weights_and_configs_left_on_a_session_model_are_found_and_undone(
    model_factory, tokenizer, session_state
):
    model = model_factory("llama")
    ids = torch.tensor([tokenizer("example:ab->").input_ids])
    with torch.no_grad():
        clean = model(ids).logits
    before = session_state.snapshot()
    forward = model.model.layers[0].forward
    model.model.layers[0].forward = lambda *args, **kwargs: forward(*args, **kwargs)  # as the replay check did
    model.register_forward_pre_hook(lambda *_: None)
    model.model.layers[2].register_forward_hook(lambda module, args, output: output * 2)
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    model.config.initializer_range = 1.0
    model.generation_config.max_new_tokens = 3
    tokenizer.chat_template = "{{ messages }}"
    found = "\n".join(session_state.leaks(before))
    for expected in (
        "llama model: _forward_pre_hooks left registered",
        "llama model.model.layers.2: _forward_hooks left registered",
        "llama model.model.layers.0: an instance `forward`",
        "llama model: weights changed in place (model.layers.1.mlp.up_proj.weight)",
        "llama model.config: attribute 'initializer_range' changed",
        "llama model.generation_config: attribute 'max_new_tokens'",
        "the session tokenizer: attribute 'chat_template'",
    ):
        assert expected in found
    assert session_state.leaks(before) == []  # all undone
    identity.weights_fingerprint(model)  # remembered afresh (the weights' version counters moved): no leak
    assert session_state.leaks(before) == []
    with torch.no_grad():
        assert torch.equal(model(ids).logits, clean)
    assert tokenizer.chat_template is None and model.config.initializer_range == 0.3


def test_a_package_global_replaced_by_hand_is_found_and_put_back(session_state):
    before = session_state.snapshot()
    chunk = sweep.ROW_CHUNK
    sweep.ROW_CHUNK = 2
    sweep.fork_scores = lambda *args: None
    found = "\n".join(session_state.leaks(before))
    assert "lm_eval_taskvec.selection.sweep: attribute 'ROW_CHUNK' changed" in found
    assert "lm_eval_taskvec.selection.sweep: attribute 'fork_scores' changed" in found
    assert sweep.ROW_CHUNK == chunk and sweep.fork_scores.__module__ == sweep.__name__


def test_a_branch_mask_kind_cached_under_a_changed_config_is_found_and_checked_again(
    model_factory, session_state, monkeypatch
):
    model = model_factory("llama")
    monkeypatch.delattr(model, "_taskvec_branch_mask", raising=False)  # as if no test had asked yet
    before = session_state.snapshot()
    with monkeypatch.context() as patch:
        patch.setattr(model.config, "_attn_implementation", "eager")
        assert branch_mask_kind(model) == "additive"  # cached on the model, the config then put back
    found = session_state.leaks(before)
    assert found == ["llama model: _taskvec_branch_mask='additive' was cached under a changed model ('bool')"]
    assert model._taskvec_branch_mask == "bool"


def test_a_file_written_into_a_saved_model_folder_is_found(saved_model, session_state):
    folder = saved_model()
    before = session_state.snapshot()
    (folder / "extra.json").write_text("{}")
    try:
        assert any("saved model folder" in leak for leak in session_state.leaks(before))
    finally:
        (folder / "extra.json").unlink()
    assert session_state.leaks(before) == []


def test_transformers_own_output_capturing_hooks_are_taken_off_without_failing(model_factory, session_state):
    """transformers hooks a model's layers the first time it returns hidden states: not the test's doing, but
    taken off all the same, so that each test runs the model as built, whatever ran before it."""
    model = model_factory("gpt2")
    before = session_state.snapshot()
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7]]), output_hidden_states=True)
    assert any(module._forward_hooks for module in model.modules())  # what transformers leaves on the model
    assert session_state.leaks(before) == []
    assert not any(module._forward_hooks for module in model.modules())
    assert not any("_output_capturing_hooks_installed" in vars(module) for module in model.modules())
    with torch.no_grad():
        assert len(model(torch.tensor([[5, 6, 7]]), output_hidden_states=True).hidden_states) == 4  # hooked again
