"""A real two-process run (torchrun, gloo, on the CPU): the ranks split the documents, sweep for layer=auto
once between them, and give every document the θ, dummies, layer and answer of one process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

SCRIPT = Path(__file__).parent / "scripts" / "ranks.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(command: list[str], tmp_path: Path, cache: Path) -> None:
    env = dict(
        os.environ,
        LM_EVAL_TASKVEC_CACHE=str(cache),
        OMP_NUM_THREADS="1",
        PYTHONPATH=str(SCRIPT.parents[2]),
        ACCELERATE_USE_CPU="1",
    )  # accelerate makes CPU processes one gloo group only when told
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def test_two_ranks_split_the_documents_sweep_once_and_answer_as_one_process(tmp_path, saved_model):
    """Given the same demonstrations: lm-eval's default sampler draws them per rank (for --model hf too), so
    the task here gives every document the same S (first_n)."""
    from lm_eval_taskvec.tasks import task_dir

    model = str(saved_model())
    ranks, alone, tasks = tmp_path / "ranks", tmp_path / "alone", tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "first_n.yaml").write_text(
        f"include: {task_dir() / 'tv_letter_to_upper.yaml'}\ntask: upper_first_n\nfewshot_config:\n  sampler: first_n\n"
    )
    options = ["--model", model, "--include_path", str(tasks), "--task", "upper_first_n"]
    two = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(_free_port())]
    _run([sys.executable, *two, str(SCRIPT), *options, "--out", str(ranks)], tmp_path, tmp_path / "cache-ranks")
    _run([sys.executable, str(SCRIPT), *options, "--out", str(alone)], tmp_path, tmp_path / "cache-alone")
    by_rank = [json.loads((ranks / f"rank{r}.json").read_text()) for r in (0, 1)]
    one = json.loads((alone / "rank0.json").read_text())
    assert [r["world_size"] for r in by_rank] == [2, 2] and one["world_size"] == 1
    documents = [r["documents"] for r in by_rank]
    assert [len(d) for d in documents] == [13, 13] and sorted(documents[0] + documents[1]) == one["documents"]
    assert sum(len(r["sweeps"]) for r in by_rank) == 1 == len(one["sweeps"])  # one sweep between the two ranks
    choices = [r["layer_selection"]["upper_first_n"] for r in [*by_rank, one]]
    assert sorted(c.pop("source") == "sweep" for c in choices[:2]) == [False, True]  # one swept, one read its file
    assert choices[0] == choices[1] == {k: v for k, v in choices[2].items() if k != "source"}
    plans = by_rank[0]["plans"] | by_rank[1]["plans"]
    assert plans.keys() == one["plans"].keys()
    for doc, plan in plans.items():  # query, dummies, block and θ of every document (batched otherwise: 1e-4)
        alone = one["plans"][doc]
        assert [plan[k] for k in ("query", "dummies", "layer")] == [alone[k] for k in ("query", "dummies", "layer")]
        assert plan["theta"] == pytest.approx(alone["theta"], abs=1e-4)
    assert by_rank[0]["answers"] == one["answers"] and len(one["answers"]) == 26
