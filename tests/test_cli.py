"""The stock ``lm_eval`` command finds hf-taskvec and the tv_* tasks through the start-up hook."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from tests.helpers import lm_eval_cli


def run_python(code: str, **env) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_start_up_hook_imports_neither_torch_nor_lm_eval():
    assert run_python("import sys; print('torch' in sys.modules, 'lm_eval' in sys.modules)") == "False False"


def test_stock_registry_knows_hf_taskvec_and_keeps_builtins():
    code = (
        "from lm_eval.api.registry import get_model; print(get_model('hf-taskvec').__name__, get_model('hf').__name__)"
    )
    assert run_python(code) == "TaskVectorLM HFLM"


def test_environment_variable_switches_the_hook_off():
    code = "import lm_eval.models; from lm_eval.api.registry import model_registry as r; print('hf-taskvec' in r)"
    assert run_python(code, LM_EVAL_TASKVEC_AUTOLOAD="0") == "False"
    assert run_python(code) == "True"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["regular", "hypothesis", "baseline"])
def test_lm_eval_command_runs_each_mode(tmp_path, saved_model, mode):
    data = lm_eval_cli(
        tmp_path, f"pretrained={saved_model()},mode={mode},layer=-1", "--tasks", "tv_letter_to_upper", "--limit", "5"
    )
    assert data["config"]["model_args"]["mode"] == mode
    assert data["config"]["taskvec"]["mode"] == mode and ("layer" in data["config"]["taskvec"]) == (
        mode == "hypothesis"
    )
    (samples,) = (tmp_path / "out").glob("*/samples_tv_letter_to_upper_*.jsonl")
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    assert len(rows) == 5  # the score is the mean of the logged documents' scores
    score = data["results"]["tv_letter_to_upper"]["exact_match,none"]
    assert score == pytest.approx(sum(r["exact_match"] for r in rows) / 5)


@pytest.mark.slow
def test_multiple_choice_task_with_lm_evals_default_delimiter(tmp_path, saved_model):
    """A loglikelihood task in lm-eval's own style ("\\n\\n" between demos, several choices)."""
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    rows = [
        {"q": f"{a} {b}", "choices": [a, b, "c"], "label": i % 2}
        for i, (a, b) in enumerate(zip("abcdefgh", "ijklmnop"))
    ]
    (tasks / "mc.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tasks / "mc.yaml").write_text(
        textwrap.dedent(f"""\
        task: tiny_mc
        dataset_path: json
        dataset_kwargs:
          data_files: {tasks / "mc.jsonl"}
        test_split: train
        output_type: multiple_choice
        doc_to_text: "Question: {{{{q}}}}\\nAnswer:"
        doc_to_choice: "{{{{choices}}}}"
        doc_to_target: label
        metric_list:
          - metric: acc
        """)
    )
    logprobs = {}
    for mode in ("hypothesis", "baseline"):
        data = lm_eval_cli(
            tmp_path / mode,
            f"pretrained={saved_model()},mode={mode},layer=1",
            "--tasks",
            "tiny_mc",
            "--include_path",
            str(tasks),
            "--num_fewshot",
            "3",
        )
        (samples,) = (tmp_path / mode / "out").glob("*/samples_tiny_mc_*.jsonl")
        rows = [json.loads(line) for line in samples.read_text().splitlines()]
        logprobs[mode] = [row["resps"] for row in rows]
        assert data["results"]["tiny_mc"]["acc,none"] == pytest.approx(sum(r["acc"] for r in rows) / len(rows))
    assert len(logprobs["hypothesis"]) == len(rows)
    assert logprobs["hypothesis"] != logprobs["baseline"]  # θ changed every choice's score


@pytest.mark.slow
def test_taskvec_sweep_prints_a_table_and_writes_a_plot(tmp_path, saved_model, monkeypatch):
    monkeypatch.setenv("LM_EVAL_TASKVEC_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "sweep"
    cmd = [
        sys.executable,
        "-m",
        "lm_eval_taskvec.cli",
        "sweep",
        "--model_args",
        f"pretrained={saved_model()},num_dev=5",
        "--tasks",
        "tv_letter_to_upper,tv_list_first",
        "--output_path",
        str(out),
    ]  # no --device: CPU here
    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "block | tv_letter_to_upper | tv_list_first | mean" in done.stdout
    choices = json.loads((out / "sweep.json").read_text())
    assert set(choices) == {"tv_letter_to_upper", "tv_list_first"}
    assert all(len(c["dev_accuracy"]) == 3 for c in choices.values())
    assert (out / "sweep.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_lm_eval_validate_finds_all_18_tasks_without_include_path():
    def validate(**env):
        done = subprocess.run(
            [sys.executable, "-m", "lm_eval", "validate", "--tasks", "task_vectors"],
            capture_output=True,
            text=True,
            env={**os.environ, **env},
        )
        return done.stdout + done.stderr

    assert "All tasks found and valid" in validate()
    assert "Tasks not found: task_vectors" in validate(LM_EVAL_TASKVEC_AUTOLOAD="0")  # the hook is what finds them
