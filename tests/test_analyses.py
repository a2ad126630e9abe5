"""The paper's analyses of θ end to end on tiny models and two in-memory tasks over the same inputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from lm_eval.api.instance import Instance
from lm_eval.tasks import TaskManager
from sklearn.metrics.pairwise import cosine_distances as sklearn_cosine_distances

from lm_eval_taskvec import thetafile
from lm_eval_taskvec.analyses import common, conflict, export, geometry, vocab
from lm_eval_taskvec.model import TaskVectorLM
from lm_eval_taskvec.selection import function_vector_of, select_layer
from lm_eval_taskvec.tasks import task_dir
from lm_eval_taskvec.theta import ThetaKey, task_vectors
from tests.helpers import make_model
from tests.tasks import LETTERS, letter_rows, make_task, requests_of

PNG = b"\x89PNG"


def doubled_rows(n: int = 24, offset: int = 0) -> list[dict]:
    """The inputs of ``letter_rows``, answered by the letter written twice: another task over the same queries."""
    return [{"input": row["input"], "answers": [row["input"] * 2]} for row in letter_rows(n, offset)]


def loaded(name: str, rows) -> object:
    """A two-split task (demonstrations from train), registered as lm-eval registers the tasks it loads."""
    task = make_task(name, splits={"train": rows(24), "test": rows(12, 24)})
    requests_of(task, limit=1)
    return task


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    return {"upper": loaded("upper", letter_rows), "double": loaded("double", doubled_rows)}


# ---------------------------------------------------------------------------------------------- geometry
def test_geometry_distances_table_and_files(make_lm, tasks, tmp_path):
    lm = make_lm("llama", num_dev=10)
    result = geometry.theta_geometry(lm, tasks, tmp_path / "out", layer="auto", num_sets=5, num_fewshot=3, seed=7)
    distances, thetas, labels = result["distances"], result["thetas"], np.array(result["labels"])
    assert thetas.shape == (10, lm.model.config.hidden_size)
    torch.testing.assert_close(distances, distances.T, rtol=0, atol=1e-12)
    torch.testing.assert_close(distances.diagonal(), torch.zeros(10, dtype=torch.float64), rtol=0, atol=1e-12)
    independent = sklearn_cosine_distances(thetas.double().numpy())
    np.testing.assert_allclose(distances.numpy(), independent, atol=1e-9)

    for row, t in zip(result["table"], range(2)):
        own, other = labels == t, labels != t
        within = independent[np.ix_(own, own)][~np.eye(5, dtype=bool)].mean()
        between = independent[np.ix_(own, other)].mean()  # two tasks: the other one is the nearest
        assert row["within"] == pytest.approx(within) and row["between"] == pytest.approx(between)
        assert row["within_lt_between"] == (within < between)
        assert row["layer"] == select_layer(lm, row["task"])["layer"]  # auto: the cached layer=auto choice

    out = tmp_path / "out"
    saved = json.loads((out / "geometry.json").read_text())
    assert [p["task"] for p in saved["tsne"]] == ["upper"] * 5 + ["double"] * 5
    pairs = 10 * 9 // 2
    assert sum(saved["histogram"]["within"]) == 2 * (5 * 4 // 2) and sum(saved["histogram"]["between"]) == pairs - 20
    header = "task,layer,num_sets,within,nearest_task,between,within_lt_between"
    assert (out / "geometry.csv").read_text().splitlines()[0] == header
    assert (out / "geometry.md").read_text().startswith("| task | layer |")
    assert (out / "geometry.png").read_bytes()[:4] == PNG


def test_identical_prompts_give_identical_theta_and_seeds_reproduce_demonstrations(make_lm, tasks):
    lm = make_lm("gpt2")
    requests = common.demonstration_sets(tasks["upper"], 4, 3, seed=3)
    assert [r.args for r in requests] == [r.args for r in common.demonstration_sets(tasks["upper"], 4, 3, seed=3)]
    assert [r.args for r in requests] != [r.args for r in common.demonstration_sets(tasks["upper"], 4, 3, seed=4)]
    assert len({r.args[0] for r in requests}) == 4  # each set its own demonstrations
    thetas = task_vectors(lm, requests + requests, [1])[0]
    assert torch.equal(thetas[:4], thetas[4:])
    distances = geometry.cosine_distances(thetas)
    assert distances[range(4), range(4, 8)].abs().max() < 1e-12
    assert distances[0, 1] > 1e-6  # different demonstrations, different θ


# ---------------------------------------------------------------------------------------------- conflict
def test_conflict_theta_of_a_prompts_own_state_changes_nothing(make_lm, tasks):
    """θ read from A's own full prompt at L, patched back at L: the patched run is the regular run."""
    lm = make_lm("llama")
    task = tasks["upper"]
    docs = [d[0] for d in conflict.shared_documents(task, task, 8, seed=0)]
    requests = [r[0] for r in conflict.few_shot_requests(task, docs, 3, 0)]
    plans = lm.plan(requests, layer=1)
    own = [conflict.replace(p, theta_key=ThetaKey(p.theta_key.demos, (p.query,), strip=False)) for p in plans]
    lm.thetas.ensure({(1, p.theta_key) for p in own})
    outputs = conflict.generations(lm, requests, own)
    assert outputs["patched"] == outputs["regular"]
    assert conflict.accuracy(task, [d for _, d in docs], outputs["patched"]) == conflict.accuracy(
        task, [d for _, d in docs], outputs["regular"]
    )
    stock = make_lm("llama", stock=True).generate_until(requests)
    assert outputs["regular"] == stock  # the regular run is lm-eval's own
    assert conflict.generations(lm, requests, plans)["patched"] != stock  # another θ does change the outputs


def test_conflict_scores_both_tasks_and_writes_files(make_lm, tasks, tmp_path):
    lm = make_lm("gpt2")
    result = conflict.conflicting_tasks(
        lm,
        tasks,
        [("upper", "double"), ("upper", "upper")],
        tmp_path / "out",
        layer=1,
        num_docs=6,
        num_fewshot=3,
        seed=0,
        metric="exact_match",
    )
    across, same = result["table"]
    assert (across["task_A"], across["task_B"], across["num_docs"], across["layer"]) == ("upper", "double", 6, 1)
    assert same["regular_acc_A"] == same["regular_acc_B"] and same["patched_acc_A"] == same["patched_acc_B"]
    for doc in result["pairs"][0]["documents"]:
        letter = doc["context"].rsplit("example:", 1)[1][:-2]
        assert (doc["target_A"], doc["target_B"]) == (letter.upper(), letter * 2)
        assert doc["context"].count("\n") == 3  # A's 3 demonstrations, then the query
    scores = result["pairs"][0]["scores"]
    for run in ("regular", "patched"):
        outputs = [d[run] for d in result["pairs"][0]["documents"]]
        assert scores[run]["B"]["exact_match"] == np.mean(
            [o == d["target_B"] for o, d in zip(outputs, result["pairs"][0]["documents"])]
        )
    out = tmp_path / "out"
    assert json.loads((out / "conflict.json").read_text())["table"] == result["table"]
    assert (out / "conflict.csv").read_text().count("\n") == 3 and (out / "conflict.png").read_bytes()[:4] == PNG


def test_conflict_refuses_pairs_without_shared_inputs_and_bad_options(make_lm, tasks, tmp_path):
    lm = make_lm("gpt2")
    words = loaded("words", lambda n, offset=0: [{"input": f"{a}{a}{a}", "answers": [a]} for a in LETTERS[offset:][:n]])
    with pytest.raises(ValueError, match=r"--pairs upper:words: no query of upper is also a query of words"):
        conflict.conflicting_tasks(
            lm, tasks | {"words": words}, [("upper", "words")], tmp_path, layer=1, metric="exact_match"
        )
    with pytest.raises(ValueError, match=r"--metric 'paper_match': task 'upper' reports \['exact_match'\]"):
        conflict.conflicting_tasks(lm, tasks, [("upper", "double")], tmp_path, layer=1)
    with pytest.raises(ValueError, match="--pairs names 'nope'"):
        conflict.conflicting_tasks(lm, tasks, [("upper", "nope")], tmp_path, layer=1, metric="exact_match")
    with pytest.raises(ValueError, match="DEMONSTRATIONS_TASK:THETA_TASK"):
        conflict.parse_pairs("tv_next_letter:tv_letter_to_upper,tv_en_es")
    assert conflict.parse_pairs(" a:b , c:d ") == [("a", "b"), ("c", "d")]


def test_unknown_task_and_layer_are_refused_by_name(make_lm, monkeypatch):
    # Index only the project's tasks: indexing all of lm-eval's takes half a minute.
    monkeypatch.setattr(
        common,
        "TaskManager",
        lambda include_path=None: TaskManager(include_path=str(task_dir()), include_defaults=False),
    )
    with pytest.raises(ValueError, match=r"--tasks: .*tv_no_such_task.* is not a registered task"):
        common.load_tasks("tv_letter_to_upper,tv_no_such_task")
    with pytest.raises(ValueError, match=r"--layer 'middle' is not 'auto'"):
        common.block_of(make_lm("gpt2"), "upper", "middle")
    with pytest.raises(ValueError, match=r"--model_args mode=regular has no meaning here"):
        common.open_model("pretrained=gpt2,mode=regular")


# ---------------------------------------------------------------------------------------------- vocab
def gemma2_softcapped(vocab: int):
    config = transformers.Gemma2Config(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=256,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        initializer_range=0.3,
        final_logit_softcapping=2.0,
        sliding_window=4,
    )
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["llama", "gemma", "gpt2", "gemma2-softcap"])
def test_projecting_the_last_blocks_output_reproduces_the_models_logits(make_lm, tokenizer, arch):
    if arch == "gemma2-softcap":
        lm = TaskVectorLM(
            pretrained=gemma2_softcapped(len(tokenizer)),
            tokenizer=tokenizer,
            device="cpu",
            batch_size=4,
            fewshot_delimiter="\n",
            mode="hypothesis",
        )
    else:
        lm = make_lm(arch, mode="hypothesis")
    prompts = [lm.tok_encode(text) for text in ("example:a->A\nexample:b->", "example: ab-> ba", "Question: c?")]
    last = len(lm.blocks) - 1
    states = lm.thetas.last_token_states([[p] for p in prompts], [last])[0, :, 0]
    projected = vocab.project(lm, states)
    with torch.no_grad():
        logits = torch.stack([lm.model(torch.tensor([p])).logits[0, -1] for p in prompts])
    torch.testing.assert_close(projected, logits, rtol=1e-5, atol=1e-5)
    if arch == "gemma2-softcap":  # the cap is active: raw norm-then-unembedding logits exceed it
        assert logits.abs().max() < 2.0
        with torch.no_grad():
            raw = lm.model.lm_head(lm.model.model.norm(states))
        assert raw.abs().max() > 2.5


def test_vocab_at_the_last_block_lists_the_models_own_next_tokens(make_lm, tasks, tmp_path):
    """One set, one dummy: mean θ at the last block is that prompt's last state, so its top tokens are the
    model's own top next tokens after [S, x']."""
    lm = make_lm("llama", num_dummy=1)
    last = len(lm.blocks) - 1
    result = vocab.vocab_projection(
        lm, tasks, tmp_path / "out", layers=["1", str(last)], top_k=5, num_sets=1, num_fewshot=3, seed=2
    )
    assert [(r["task"], r["layer"]) for r in result["table"]] == [
        ("upper", 1),
        ("upper", last),
        ("double", 1),
        ("double", last),
    ]
    for name in tasks:
        (request,) = common.demonstration_sets(tasks[name], 1, 3, seed=2)
        (plan,) = lm.plan([request], layer=last)
        with torch.no_grad():
            logits = lm.model(torch.tensor([lm.tok_encode(plan.theta_key.demos + plan.theta_key.dummies[0])])).logits[
                0, -1
            ]
        entry = next(e for e in result["entries"] if e["task"] == name and e["layer"] == last)
        assert [t["id"] for t in entry["tokens"]] == logits.topk(5).indices.tolist()
        assert [t["prob"] for t in entry["tokens"]] == pytest.approx(
            logits.softmax(-1).topk(5).values.tolist(), abs=1e-5
        )
    out = tmp_path / "out"
    assert json.loads((out / "vocab.json").read_text())["table"] == result["table"]
    assert (out / "vocab.md").exists() and (out / "vocab.csv").exists() and (out / "vocab.png").read_bytes()[:4] == PNG


def test_vocab_of_a_function_vector_is_the_vector_through_the_final_norm_and_unembedding(make_lm, tasks, tmp_path):
    lm = make_lm("llama", mode="hypothesis", method="function_vector", num_dev=6, top_heads=2)
    result = vocab.vocab_projection(lm, {"upper": tasks["upper"]}, tmp_path / "out", layers=["1"], top_k=5)
    key, record = function_vector_of(lm, "upper")
    with torch.no_grad():  # Llama's readout, by hand
        logits = lm.model.lm_head(lm.model.model.norm(lm.thetas.get(1, key)))
    (entry,) = result["entries"]
    assert [t["id"] for t in entry["tokens"]] == logits.topk(5).indices.tolist()
    assert entry["function_vector"]["top_heads"] == record["top_heads"] and entry["num_fewshot"] == 3


# ---------------------------------------------------------------------------------------------- export
def test_export_round_trips_theta_exactly_with_its_metadata(make_lm, tasks, tmp_path):
    """The file holds, per task and block, the mean over demonstration sets of each set's θ (the mean over its
    dummies of the block's output at the last token of [S, x']), written out here from plain forward passes:
    hidden_states[L + 1] is block L's output below the last block (the last one's is after the final norm)."""
    lm = make_lm("llama", num_dummy=2)
    saved = export.export_thetas(lm, tasks, tmp_path / "out", layers=["0", "1"], num_sets=3, num_fewshot=3, seed=5)
    loaded_file = thetafile.load_thetas(tmp_path / "out" / thetafile.FILE_NAME, lm)
    assert set(loaded_file.thetas) == {(t, layer) for t in tasks for layer in (0, 1)}
    for key, stored in saved.thetas.items():
        again = loaded_file.thetas[key]
        assert again.theta.dtype == torch.float32 and torch.equal(again.theta, stored.theta)
        assert again.info == stored.info
    expected = {}
    for name in tasks:
        requests = common.demonstration_sets(tasks[name], 3, 3, seed=5)
        assert len({r.args[0] for r in requests}) == 3  # three sets of their own
        for layer in (0, 1):
            per_set = []
            for plan in lm.plan(requests, layer=layer):
                key = plan.theta_key
                assert len(key.dummies) == 2 and not key.strip
                with torch.no_grad():
                    states = [
                        lm.model(
                            torch.tensor([lm.tok_encode(key.demos + dummy)]), output_hidden_states=True
                        ).hidden_states[layer + 1][0, -1]
                        for dummy in key.dummies
                    ]
                per_set.append(torch.stack(states).mean(0))
            expected[name, layer] = torch.stack(per_set).mean(0)
            torch.testing.assert_close(loaded_file.get(name, layer).theta, expected[name, layer], rtol=1e-5, atol=1e-5)
        info = loaded_file.get(name, 1).info
        assert (info["num_sets"], info["num_fewshot"], info["num_dummy"], info["seed"]) == (3, 3, 2, 5)
        assert info["prompt_format"]["example_context"] == requests[0].args[0]
    assert not torch.allclose(expected["upper", 1], expected["double", 1], atol=1e-3)  # the tasks' θ differ
    assert loaded_file.model["hidden_size"] == 32 and loaded_file.model["num_blocks"] == 3
    with pytest.raises(ValueError, match=r"holds θ of 'upper' at blocks \[0, 1\]: pass layer"):
        loaded_file.get("upper")
    with pytest.raises(ValueError, match=r"holds no θ for task 'lower'"):
        loaded_file.get("lower")


def test_theta_path_evaluates_zero_shot_with_the_saved_theta(make_lm, tasks, tmp_path):
    """Save, load, evaluate: hypothesis mode with theta_path= generates what patching the saved θ by hand at
    the query's last token generates, with no demonstrations in the prompt."""
    from lm_eval_taskvec.layers import write_states

    lm = make_lm("llama", num_dummy=2)
    export.export_thetas(lm, tasks, tmp_path / "out", layers=["1"], num_sets=3, num_fewshot=3, seed=5)
    path = tmp_path / "out" / thetafile.FILE_NAME
    theta = thetafile.load_thetas(path, lm).get("upper").theta
    zero_shot = make_task("upper", splits={"train": letter_rows(24), "test": letter_rows(12, 24)}, num_fewshot=0)
    requests = requests_of(zero_shot, limit=6)
    assert requests[0].args[0] == f"example:{requests[0].doc['input']}->"  # no demonstrations at all
    stored = make_lm("llama", mode="hypothesis", theta_path=str(path), fewshot_delimiter=None)
    outputs = stored.generate_until(requests)
    by_hand = make_lm("llama", stock=True, batch_size=1)
    for request, output in zip(requests, outputs):
        with write_states(stored.blocks[1], theta[None], -1, first_call_only=True) as record:
            assert by_hand.generate_until([request]) == [output]
        assert record.patched == 1
    assert make_lm("llama", stock=True).generate_until(requests) != outputs  # the query alone answers otherwise
    info = stored.get_model_info()["taskvec"]
    assert info["theta_path"] == str(path) and info["theta_source"]["num_blocks"] == 3
    # Requests with no document (direct API calls): the whole context is the query, unless a delimiter is given
    direct = [
        Instance("generate_until", {}, (c, {"max_gen_toks": 2}), 0, ("upper", 0, 1))
        for c in ("example:q->", "example:a->A\nexample:q->")
    ]
    assert stored.plan(direct[:1])[0].query == "example:q->"
    split = make_lm("llama", mode="hypothesis", theta_path=str(path), fewshot_delimiter="\n").plan(direct[1:])[0]
    assert split.query == "example:q->"
    with pytest.raises(ValueError, match="theta_path=.*only mode=hypothesis"):
        make_lm("llama", mode="baseline", theta_path=str(path))


def test_loading_theta_for_another_model_is_refused_naming_both(make_lm, tasks, tmp_path, tokenizer):
    lm = TaskVectorLM(
        pretrained=make_model("llama", len(tokenizer)),
        tokenizer=tokenizer,
        device="cpu",
        batch_size=4,
        fewshot_delimiter="\n",
    )  # its own copy: this test edits a weight
    path = export.export_thetas(lm, {"upper": tasks["upper"]}, tmp_path, layers=["1"], num_sets=2, num_fewshot=3).path
    with pytest.raises(
        ValueError,
        match=r"made for model 'LlamaForCausalLM' \(llama.*not for this model "
        r"'GPT2LMHeadModel' \(gpt2",
    ):
        thetafile.load_thetas(path, make_lm("gpt2"))
    wider = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=48,
            intermediate_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            bos_token_id=1,
            eos_token_id=2,
            pad_token_id=0,
        )
    )
    other = TaskVectorLM(pretrained=wider, tokenizer=tokenizer, device="cpu", batch_size=4, fewshot_delimiter="\n")
    with pytest.raises(
        ValueError,
        match=r"hidden size 32 from model 'LlamaForCausalLM'; this model "
        r"'LlamaForCausalLM' has hidden size 48",
    ):
        thetafile.load_thetas(path, other)
    with torch.no_grad():
        lm.model.lm_head.weight[0, 0] += 1.0  # the same architecture with other weights
    with pytest.raises(ValueError, match=r"weights [0-9a-f]{12}\), not for this model"):
        thetafile.load_thetas(path, lm)
    (tmp_path / "not.safetensors").write_bytes(b"hello")
    with pytest.raises(ValueError, match="is not a safetensors file"):
        thetafile.load_thetas(tmp_path / "not.safetensors", lm)
    with pytest.raises(FileNotFoundError, match="theta_path=.*missing.safetensors does not exist"):
        thetafile.load_thetas(tmp_path / "missing.safetensors", lm)


def test_a_missing_extra_is_named():
    with pytest.raises(ImportError, match=r"needs no_such_module: pip install 'lm-eval-taskvec\[analyses\]'"):
        common.require("no_such_module.manifold")


def test_write_table_rounds_floats_in_the_csv_and_leaves_other_values_alone(tmp_path):
    rows = [
        {
            "task": "a",
            "layer": 3,
            "within": 0.1 + 0.2,
            "between": 2 / 3,
            "p": 20 / 512 / 100,
            "norm": 1234.56789,
            "separated": True,
        },
        {
            "task": "b",
            "layer": 12,
            "within": 0.39999999999999997,
            "between": 0.0,
            "p": 1.0,
            "norm": 7.0,
            "separated": False,
        },
    ]
    text = common.write_table(rows, tmp_path / "t")
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines == [
        "task,layer,within,between,p,norm,separated",
        "a,3,0.3,0.6667,0.0003906,1234.5679,True",  # 0.30000000000000004; p keeps 4 significant digits
        "b,12,0.4,0.0,1.0,7.0,False",
    ]
    assert "| a | 3 | 0.300 | 0.667 | 0.000 | 1234.568 | True |" in text  # the markdown as before: 3 decimals


# ---------------------------------------------------------------------------------------------- the commands
@pytest.mark.parametrize(
    "command, options, files",
    [
        (
            "geometry",
            ["--tasks", "upper,double", "--num_sets", "3", "--num_fewshot", "2"],
            ["geometry.md", "geometry.png"],
        ),
        (
            "conflict",
            ["--pairs", "upper:double", "--num_docs", "4", "--metric", "exact_match"],
            ["conflict.md", "conflict.png"],
        ),
        (
            "vocab",
            ["--tasks", "upper", "--layers", "0,2", "--num_sets", "2", "--top_k", "3"],
            ["vocab.md", "vocab.png"],
        ),
        (
            "export",
            ["--tasks", "upper,double", "--num_sets", "2", "--layers", "0.5,2"],
            ["thetas.safetensors", "thetas.md"],
        ),
    ],
)
def test_taskvec_commands_pass_their_options(make_lm, tasks, tmp_path, monkeypatch, command, options, files):
    """``taskvec <command>`` parses its options into its module's run (model and tasks stubbed: tiny, in memory)."""
    from lm_eval_taskvec import cli

    lm = make_lm("gpt2")
    module = {"geometry": geometry, "conflict": conflict, "vocab": vocab, "export": export}[command]
    monkeypatch.setattr(module, "open_model", lambda model_args, batch_size, device, method: lm)
    monkeypatch.setattr(
        module,
        "load_tasks",
        lambda names, include_path, lm=None, chat=None: (
            {n: tasks[n] for n in names.split(",")} if isinstance(names, str) else {n: tasks[n] for n in names}
        ),
    )
    out = tmp_path / "out"
    cli.main([command, "--layer", "1", "--output_path", str(out), "--seed", "3", *options])
    assert all((out / name).stat().st_size > 0 for name in files)
    rows = (out / (files[0].split(".")[0] + ".csv")).read_text().splitlines()[1:]
    expected = {
        "geometry": ["upper,1,3", "double,1,3"],
        "conflict": ["upper,double,1,4"],
        "vocab": ["upper,0,", "upper,2,"],
        "export": ["upper,1,", "upper,2,", "double,1,", "double,2,"],
    }[command]
    assert [row[: len(e)] for row, e in zip(rows, expected)] == expected and len(rows) == len(expected)


@pytest.mark.slow
def test_taskvec_export_command_on_the_tv_tasks_loads_back(tmp_path, saved_model):
    model_dir = saved_model()
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval_taskvec.cli",
        "export",
        "--model_args",
        f"pretrained={model_dir}",
        "--tasks",
        "tv_algorithmic",
        "--num_sets",
        "2",
        "--layer",
        "1",
        "--device",
        "cpu",
        "--output_path",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    stored = thetafile.load_thetas(out / "thetas.safetensors", TaskVectorLM(pretrained=str(model_dir), device="cpu"))
    assert sorted(stored.thetas) == sorted(
        (name, 1)
        for name in [
            "tv_next_letter",
            "tv_prev_letter",
            "tv_list_first",
            "tv_list_last",
            "tv_letter_to_upper",
            "tv_letter_to_lower",
        ]
    )
    assert stored.get("tv_list_first").info["num_fewshot"] == 5  # the task's own, by default
    assert "example:" in stored.get("tv_list_first").info["prompt_format"]["example_context"]


@pytest.mark.parametrize(("method", "scale", "shots"), [("elicit", 2.0, 3), ("function_vector", 1.0, None)])
def test_an_exported_added_vector_is_added_at_its_scale_when_loaded_back(
    make_lm, tasks, tmp_path, method, scale, shots
):
    """The file records the method, op and scale; theta_path= applies θ that way: the first generated token is
    the argmax with block 1's output at the query's last token shifted by scale·θ (a hook written here). A
    function vector's file holds the vector of method=function_vector's own run and its heads."""
    lm = make_lm("llama", num_dummy=2, num_dev=6, top_heads=2)
    export.export_thetas(
        lm, tasks, tmp_path / "out", layers=["1"], num_sets=3, num_fewshot=shots, seed=5, method=method
    )
    path = tmp_path / "out" / thetafile.FILE_NAME
    entry = thetafile.load_thetas(path, lm).get("upper")
    assert (entry.info["method"], entry.info["op"], entry.info["scale"]) == (method, "add", scale)
    if method == "function_vector":
        own = make_lm("llama", mode="hypothesis", layer=1, method=method, num_dev=6, top_heads=2)
        key, record = function_vector_of(own, "upper")
        torch.testing.assert_close(entry.theta, own.thetas.get(1, key).float(), rtol=0, atol=0)
        assert entry.info["function_vector"]["top_heads"] == record["top_heads"] and entry.info["num_sets"] is None
    zero_shot = make_task("upper", splits={"train": letter_rows(24), "test": letter_rows(12, 24)}, num_fewshot=0)
    requests = [
        Instance("generate_until", {}, (r.args[0], {"until": [], "max_gen_toks": 1}), r.idx, r.metadata)
        for r in requests_of(zero_shot, limit=6)
    ]
    stored = make_lm("llama", mode="hypothesis", theta_path=str(path), fewshot_delimiter=None)
    assert stored.settings.parts == ("prompt", "add", scale)
    outputs = stored.generate_until(requests)

    def shift(module, args, output):
        hidden = (output if isinstance(output, torch.Tensor) else output[0]).clone()
        hidden[:, -1] += scale * entry.theta
        return hidden if isinstance(output, torch.Tensor) else (hidden, *output[1:])

    for request, output in zip(requests, outputs):
        handle = stored.blocks[1].register_forward_hook(shift)
        try:
            with torch.no_grad():
                token = stored.model(torch.tensor([stored.tok_encode(request.args[0])])).logits[0, -1].argmax()
        finally:
            handle.remove()
        assert output == stored.tok_decode([token.item()])
    with pytest.raises(ValueError, match="theta_path= applies each stored θ the way it was exported.*leave out op=add"):
        make_lm("llama", mode="hypothesis", theta_path=str(path), op="add")
