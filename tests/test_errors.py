"""Bad input gets a clear error naming the argument and the fix, never a silent wrong number."""

from __future__ import annotations

import pytest
from lm_eval.api.instance import Instance
from torch import nn

from lm_eval_taskvec.layers import find_blocks
from tests.helpers import GEN, context, gen_requests


def test_hypothesis_needs_demonstrations(make_lm):
    lm = make_lm(mode="hypothesis", layer=1)
    reqs = [Instance("generate_until", {}, ("example:k->", dict(GEN)), i, ("t", i, 1)) for i in range(3)]
    with pytest.raises(ValueError, match="no demonstrations.*--num_fewshot"):
        lm.generate_until(reqs)


@pytest.mark.parametrize("layer", [3, -4, 1.5, "3", "middle", True, [1]])
def test_layer_out_of_range(make_lm, layer):
    with pytest.raises(ValueError, match="layer="):
        make_lm(mode="hypothesis", layer=layer)


@pytest.mark.parametrize("layer, block", [(-1.0, 2), (0.5, 1), ("2", 2), (-3, 0), ("0.34", 1)])
def test_layer_forms_the_cli_sends(make_lm, layer, block):
    assert make_lm(mode="hypothesis", layer=layer).settings.layer == block


def test_auto_layer_needs_the_runs_task(make_lm):
    lm = make_lm(mode="hypothesis")  # layer=auto is the default
    with pytest.raises(ValueError, match="dev documents of task .nowhere.*layer=<block"):
        lm.generate_until([Instance(r.request_type, {}, r.args, r.idx, ("nowhere", r.idx, 1)) for r in gen_requests()])


def test_unknown_mode(make_lm):
    with pytest.raises(ValueError, match="mode='hypothesys' is unknown.*regular, hypothesis, baseline"):
        make_lm(mode="hypothesys", layer=1)


@pytest.mark.parametrize("num_dummy", [0, 1.5, "two", True, [2]])
def test_bad_num_dummy(make_lm, num_dummy):
    with pytest.raises(ValueError, match="num_dummy"):
        make_lm(mode="hypothesis", layer=1, num_dummy=num_dummy)


def test_the_smallest_counts_are_accepted(make_lm):
    lm = make_lm(mode="hypothesis", layer=1, num_dummy=1, num_dev="2")
    assert (lm.settings.num_dummy, lm.settings.num_dev) == (1, 2)


def test_blocks_not_found():
    with pytest.raises(ValueError, match="could not find the decoder blocks.*layers_path"):
        find_blocks(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))


def test_bad_layers_path(make_lm):
    with pytest.raises(ValueError, match="layers_path='model.nope'"):
        make_lm(mode="hypothesis", layer=1, layers_path="model.nope")


def test_layers_path_override(make_lm):
    lm = make_lm("gpt2", mode="hypothesis", layer=1, layers_path="transformer.h")
    assert lm.blocks is lm.model.transformer.h


def test_dummy_pool_too_small(make_lm):
    lm = make_lm(mode="hypothesis", layer=1, num_dummy=2)
    reqs = gen_requests()[:2]  # each document has only one other query to borrow
    with pytest.raises(ValueError, match="num_dummy=2.*--limit"):
        lm.generate_until(reqs)


def test_rolling_loglikelihood_has_no_demonstrations(make_lm):
    lm = make_lm(mode="baseline")
    req = Instance("loglikelihood_rolling", {}, (context("ab", "c"),), 0, ("t", 0, 1))
    with pytest.raises(ValueError, match="mode=regular"):
        lm.loglikelihood_rolling([req])


def test_rolling_loglikelihood_in_regular_mode_is_hflms(make_lm):
    req = Instance("loglikelihood_rolling", {}, ("example:ab->AB\nexample:c->C",), 0, ("t", 0, 1))
    assert make_lm(mode="regular").loglikelihood_rolling([req]) == make_lm(stock=True).loglikelihood_rolling([req])


def test_explicit_delimiter_that_is_absent(make_lm):
    lm = make_lm(mode="baseline", fewshot_delimiter="###")
    with pytest.raises(ValueError, match="fewshot_delimiter"):
        lm.generate_until(gen_requests())


def test_fewshot_delimiter_escapes_from_the_command_line(make_lm):
    assert make_lm(mode="baseline", fewshot_delimiter="\\n\\n").settings.fewshot_delimiter == "\n\n"


def test_use_cache_never_hands_one_modes_answers_to_another(make_lm, tmp_path):
    from lm_eval.api.model import CachingLM

    path = str(tmp_path / "answers.db")
    baseline = CachingLM(make_lm(mode="baseline"), path)
    baseline.generate_until(gen_requests())  # answers land in the database
    CachingLM(make_lm(mode="baseline"), path)  # the same mode reuses them
    with pytest.raises(ValueError, match="holds .*baseline.*own --use_cache path"):
        CachingLM(make_lm(mode="hypothesis", layer=1), path)
    with pytest.raises(ValueError, match="own --use_cache path"):
        CachingLM(make_lm(mode="hypothesis", layer=2), str(tmp_path / "other.db")).lm  # noqa: B018 (marks layer 2)
        CachingLM(make_lm(mode="hypothesis", layer=1), str(tmp_path / "other.db"))


def test_use_cache_written_by_stock_hf_serves_regular_only(make_lm, tmp_path):
    from lm_eval.api.model import CachingLM

    path = str(tmp_path / "stock.db")
    CachingLM(make_lm(stock=True), path).generate_until(gen_requests())
    with pytest.raises(ValueError, match="another model"):
        CachingLM(make_lm(mode="baseline"), path)
    CachingLM(make_lm(mode="regular"), path)  # regular is stock HFLM: its answers are the same


@pytest.mark.parametrize("extra", [{"num_beams": 2}, {"num_return_sequences": 2}])
def test_beam_search_is_refused_before_any_work(make_lm, extra):
    reqs = [
        Instance(r.request_type, {}, (r.args[0], {**r.args[1], **extra}), r.idx, r.metadata) for r in gen_requests()
    ]
    with pytest.raises(ValueError, match="num_beams/num_return_sequences > 1"):
        make_lm(mode="hypothesis", layer=1).generate_until(reqs)


@pytest.mark.parametrize(
    "arg, message",
    [
        ({"num_dummy": 0}, r"num_dummy=0 must be an integer >= 1$"),
        ({"num_dev": 1}, r"num_dev=1 must be an integer >= 2$"),
        ({"seed": 1.5}, r"seed=1.5 must be an integer$"),
    ],
)
def test_count_messages_name_the_allowed_values(make_lm, arg, message):
    with pytest.raises(ValueError, match=message):
        make_lm(mode="hypothesis", layer=1, **arg)
