"""``taskvec compare``: every mode, run and method side by side in one table, with paired tests.

lm-eval renders one run at a time (``make_table``) and has no paired test; this merges results files of any
model type, or runs hf-taskvec's modes first, then writes compare.md/.csv/.json and compare.png.
"""

from __future__ import annotations

import json
from pathlib import Path

from lm_eval_taskvec.comparison.evaluate import run_modes
from lm_eval_taskvec.comparison.plot import plot as draw
from lm_eval_taskvec.comparison.render import markdown, to_csv, to_json
from lm_eval_taskvec.comparison.runs import ResultsPathError, Run, UsageError, load_runs
from lm_eval_taskvec.comparison.table import Comparison, build
from lm_eval_taskvec.settings import MODES

__all__ = [
    "MODES",
    "Comparison",
    "ResultsPathError",
    "Run",
    "UsageError",
    "build",
    "compare",
    "load_runs",
    "run_modes",
    "write",
]


def compare(
    results=(),
    output_path=None,
    *,
    model_args=None,
    tasks=None,
    modes=MODES,
    pairs=None,
    metric: str | None = None,
    paired_iters: int = 10_000,
    paired_seed: int = 1234,
    plot: bool = True,
    **run_options,
) -> Comparison:
    """The comparison of ``results`` (lm-eval results files or folders), after running ``modes`` of
    hf-taskvec on ``tasks`` first when ``model_args`` or ``tasks`` is given (``run_options``: see
    ``run_modes``). With ``output_path`` it writes compare.md, .csv, .json and .png there (and the runs'
    own results under ``<output_path>/<mode>/``). ``pairs``: (a, b) column labels or numbers to test.
    """
    runs = load_runs(results)  # bad paths fail before a model loads
    if model_args is not None or tasks is not None:
        if not tasks:
            raise UsageError("tasks: name the tasks or groups to run the modes on (e.g. tasks='task_vectors')")
        if output_path is None:
            raise UsageError("output_path: running the modes writes each mode's results under it; give a folder")
        runs += load_runs(run_modes(model_args or "pretrained=embedded", tasks, output_path, modes, **run_options))
    elif run_options:
        raise UsageError(f"{', '.join(sorted(run_options))}: options for running the modes; give tasks too")
    if not runs:
        raise UsageError("results: give lm-eval results files or folders, or tasks (and model_args) to run the modes")
    table = build(runs, pairs=pairs, metric=metric, iters=paired_iters, seed=paired_seed)
    if output_path is not None:
        write(table, Path(output_path), plot=plot)
    return table


def write(table: Comparison, out: Path, plot: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = [out / "compare.md", out / "compare.csv", out / "compare.json"]
    files[0].write_text(markdown(table), encoding="utf-8")
    files[1].write_text(to_csv(table), encoding="utf-8")
    files[2].write_text(json.dumps(to_json(table), indent=1, ensure_ascii=False, default=str), encoding="utf-8")
    if plot:
        files.append(out / "compare.png")
        draw(table, files[-1])
    return files
