"""Running hf-taskvec's modes in one process: the model loads once, each mode goes through lm-eval's own
evaluator and its results (and samples) are written where ``lm_eval --output_path <out>/<mode>`` writes them."""

from __future__ import annotations

from pathlib import Path

from lm_eval_taskvec.comparison.runs import UsageError
from lm_eval_taskvec.settings import MODES

SEED_KEYS = ("random_seed", "numpy_random_seed", "torch_random_seed", "fewshot_random_seed")


def run_modes(
    model_args,
    tasks,
    output_path,
    modes=MODES,
    *,
    num_fewshot: int | None = None,
    limit=None,
    batch_size="8",
    device: str | None = None,
    gen_kwargs=None,
    include_path: str | None = None,
    seed=None,
    log_samples: bool = False,
    methods=None,
    apply_chat_template: bool | str = False,
    fewshot_as_multiturn: bool | None = None,
) -> list[Path]:
    """Evaluate ``tasks`` in each of ``modes`` with one loaded ``TaskVectorLM``; returns the results files.
    With ``methods`` (e.g. "hendel,elicit"), hypothesis runs once per method, written under
    ``<output_path>/hypothesis-<method>``; regular and baseline run once.

    The options mean what lm_eval's do; ``seed`` is lm_eval's ``--seed`` (one integer, or four separated by
    commas: python, numpy, torch, few-shot); ``fewshot_as_multiturn`` defaults to on under a chat template.
    ``model_args`` must not hold ``mode``: ``modes`` chooses them.
    """
    import lm_eval
    from lm_eval.loggers import EvaluationTracker
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import simple_parse_args_string

    import lm_eval_taskvec  # noqa: F401  (registers the tv_* task folder even when the start-up hook is off)
    from lm_eval_taskvec.model import TaskVectorLM

    modes = _check_modes(modes)
    if fewshot_as_multiturn and not apply_chat_template:
        raise UsageError("fewshot_as_multiturn needs apply_chat_template (as in lm_eval)")
    chat = {}  # left to simple_evaluate's defaults without a chat template, as lm_eval's CLI leaves them
    if apply_chat_template:
        multiturn = True if fewshot_as_multiturn is None else fewshot_as_multiturn
        chat = {"apply_chat_template": apply_chat_template, "fewshot_as_multiturn": multiturn}
    args = simple_parse_args_string(model_args) if isinstance(model_args, str) else dict(model_args or {})
    if "mode" in args:
        raise UsageError(f"model_args: leave out mode={args['mode']}; modes (--modes) chooses the modes to run")
    methods = _check_methods(methods, modes, args)
    task_list = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    seeds = _seeds(seed)
    extra = {"device": device} if device else {}
    modes = tuple(sorted(modes, key=lambda m: m != "regular"))  # regular first: it prepares θ from the same S
    lm = TaskVectorLM(**args, mode=modes[0], batch_size=batch_size, **extra)
    lm.set_mode(modes[0], shared_modes=modes)
    runs = [(mode, method) for mode in modes for method in (methods if mode == "hypothesis" else [None])]
    # Tasks carry the model args in their metadata, as in an lm_eval run; TaskManager indexes every task
    # folder once, and reads this dict when it loads tasks, so each mode's configs name that mode.
    metadata = dict(args)
    manager = TaskManager(include_path=include_path, metadata=metadata)
    written = []
    for mode, method in runs:
        lm.set_mode(mode)
        if method:
            lm.set_method(method)
        metadata["mode"] = mode
        folder = f"{mode}-{method}" if method else mode
        tracker = EvaluationTracker(output_path=str(Path(output_path) / folder))
        results = lm_eval.simple_evaluate(
            model=lm,
            model_args=args | {"mode": mode} | ({"method": method} if method else {}),
            tasks=task_list,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            device=device,
            limit=limit,
            gen_kwargs=gen_kwargs,
            task_manager=manager,
            log_samples=log_samples,
            evaluation_tracker=tracker,
            **chat,
            **seeds,
        )
        written.append(_save(tracker, results, log_samples))
    return written


def _save(tracker, results: dict, log_samples: bool) -> Path:
    """What lm_eval's CLI does after evaluating, naming the model type as ``--model hf-taskvec`` would."""
    results["config"]["model"] = tracker.general_config_tracker.model_source = "hf-taskvec"
    samples = results.pop("samples", None) if log_samples else None
    tracker.save_results_aggregated(results=results, samples=samples)
    if log_samples:
        for task_name in results["configs"]:
            tracker.save_results_samples(task_name=task_name, samples=samples[task_name])
    path = Path(tracker.output_path) / tracker.general_config_tracker.model_name_sanitized
    path = path / f"results_{tracker.date_id}.json"
    if not path.is_file():  # lm-eval logs a failed save as a warning only
        raise OSError(f"lm-eval did not write {path}; check that --output_path is writable")
    return path


def _check_methods(methods, modes: tuple[str, ...], args: dict) -> list[str]:
    """The methods whose hypothesis runs each get a column (none given: the model args' own method)."""
    from lm_eval_taskvec.settings import METHODS

    if methods is None:
        return [None]
    methods = [m.strip() for m in methods.split(",")] if isinstance(methods, str) else list(methods)
    if not methods or len(set(methods)) != len(methods) or any(m not in METHODS for m in methods):
        raise UsageError(
            f"methods: {','.join(methods) or 'nothing'} is not a list of distinct methods from {','.join(METHODS)}"
        )
    if "hypothesis" not in modes:
        raise UsageError("methods: each method is a hypothesis run; include hypothesis in modes")
    given = sorted(k for k in ("method", "vector", "op", "scale") if k in args)
    if given:
        raise UsageError(f"model_args: leave out {', '.join(given)}; methods (--methods) chooses each run's method")
    return methods


def _check_modes(modes) -> tuple[str, ...]:
    modes = tuple(m.strip() for m in modes.split(",")) if isinstance(modes, str) else tuple(modes)
    bad = [m for m in modes if m not in MODES]
    if bad or not modes or len(set(modes)) != len(modes):
        raise UsageError(
            f"modes: {','.join(modes) or 'nothing'} is not a list of distinct modes from {','.join(MODES)}"
        )
    return modes


def _seeds(seed) -> dict:
    if seed is None:
        return {}
    values = [seed] if isinstance(seed, int) else str(seed).split(",")
    try:
        values = [None if str(v).strip().lower() == "none" else int(v) for v in values]
    except ValueError:
        raise UsageError(
            f"seed: {seed!r} is not one integer or four separated by commas "
            "(python,numpy,torch,fewshot; None leaves one unset)"
        ) from None
    if len(values) == 1:
        values *= len(SEED_KEYS)
    if len(values) != len(SEED_KEYS):
        raise UsageError(f"seed: {seed!r} has {len(values)} values; give one, or four (python,numpy,torch,fewshot)")
    return dict(zip(SEED_KEYS, values))
