"""Start-up hook that makes the stock ``lm_eval`` command know ``hf-taskvec`` and the ``tv_*`` tasks.

A ``.pth`` file imports the package, which runs :func:`install`, at interpreter start-up. It must cost almost
nothing, so it imports neither torch nor lm_eval: it only puts a finder on ``sys.meta_path`` that runs our
registration right after lm_eval itself imports ``lm_eval.models`` (registering earlier would hide every
built-in model) and ``lm_eval.tasks.manager``. ``LM_EVAL_TASKVEC_AUTOLOAD=0`` switches it off
(``import lm_eval_taskvec`` still registers everything).
"""

from __future__ import annotations

import os
import sys

MODEL_NAME = "hf-taskvec"
MODEL_TARGET = "lm_eval_taskvec.model:TaskVectorLM"

# Tasks lm-eval loaded in this process, by name: layer=auto reads their validation split through the very
# task objects of the run (with its --num_fewshot and few-shot settings).
LOADED_TASKS: dict = {}
PROMPT_SETTINGS = ("system_instruction", "apply_chat_template", "fewshot_as_multiturn")
# While lm-eval's evaluate() runs: its tasks by name ("tasks"), those whose first prompt --write_out printed
# ("written_out"), and the models that checked them all before running any ("checked"); empty between runs.
CURRENT_RUN: dict = {}


def record_prompt_settings(task, settings: dict, chat_template=None) -> None:
    """What shapes a task's prompts besides its config: the run's system instruction and chat settings, and the
    model's ``apply_chat_template``. layer=auto's dev prompts and the analyses' demonstrations are built with them."""
    task.taskvec_prompt_settings = {key: settings.get(key) for key in PROMPT_SETTINGS}
    task.taskvec_chat_template = chat_template


def register_model() -> None:
    from lm_eval.api.registry import model_registry

    if MODEL_NAME not in model_registry:
        # A lazy "module:Class" string: torch and transformers load only when the model is used.
        model_registry.register(MODEL_NAME, target=MODEL_TARGET)


def add_task_path() -> None:
    """Make every default-configured TaskManager also scan the project's task folder, and record the tasks
    lm-eval loads and the prompt settings they build requests with."""
    from lm_eval.api.task import Task
    from lm_eval.tasks.manager import TaskManager

    if getattr(TaskManager.__init__, "_taskvec", False):
        return
    original_init, original_load, original_build = TaskManager.__init__, TaskManager.load, Task.build_all_requests

    def __init__(self, *args, include_path=None, include_defaults=True, **kwargs):
        if include_defaults:
            from lm_eval_taskvec.tasks import task_dir

            paths = list(include_path) if isinstance(include_path, (list, tuple)) else [include_path]
            paths = [p for p in paths if p]
            if not any(os.path.abspath(p) == str(task_dir()) for p in paths):
                paths.insert(0, str(task_dir()))  # first, so a user's own --include_path overrides ours
            include_path = paths
        original_init(self, *args, include_path=include_path, include_defaults=include_defaults, **kwargs)

    def load(self, *args, **kwargs):
        loaded = original_load(self, *args, **kwargs)
        LOADED_TASKS.update(loaded.get("tasks", {}))
        for name, task in loaded.get("tasks", {}).items():
            # What the task's own config says, before the evaluator applies --num_fewshot (which lm-eval ignores
            # for a config that pins num_fewshot: 0), and where that config is: refusals name the fix.
            task.taskvec_config_shots = task.get_config("num_fewshot")
            entry = getattr(self, "_index", {}).get(name)
            task.taskvec_yaml = str(entry.yaml_path) if getattr(entry, "yaml_path", None) else None
        return loaded

    def build_all_requests(self, *args, **kwargs):
        record_prompt_settings(self, kwargs, kwargs.get("chat_template"))
        self.taskvec_samples = kwargs.get("samples")  # --samples renumbers Instance.doc_id (planning.document_index)
        LOADED_TASKS[self.config.task] = self
        return original_build(self, *args, **kwargs)

    __init__._taskvec = True
    TaskManager.__init__, TaskManager.load, Task.build_all_requests = __init__, load, build_all_requests


def watch_runs() -> None:
    """Make lm-eval's ``evaluate`` say which tasks a run holds (``CURRENT_RUN``) for as long as it runs, so that
    the model can check every task before it runs any, and ``--write_out`` say which tasks it printed."""
    import lm_eval.evaluator as evaluator

    if getattr(evaluator.evaluate, "_taskvec", False):
        return
    original_evaluate, original_writeout = evaluator.evaluate, evaluator.print_writeout

    def evaluate(*args, **kwargs):
        task_dict = kwargs.get("task_dict", args[1] if len(args) > 1 else None)
        tasks = task_dict.get("tasks") if isinstance(task_dict, dict) else None
        saved = dict(CURRENT_RUN)
        CURRENT_RUN.clear()
        CURRENT_RUN.update(tasks=dict(tasks or {}), written_out=set(), checked=set())
        try:
            return original_evaluate(*args, **kwargs)
        finally:
            CURRENT_RUN.clear()
            CURRENT_RUN.update(saved)

    def print_writeout(task):
        CURRENT_RUN.setdefault("written_out", set()).add(task.config.task)
        return original_writeout(task)

    evaluate.__doc__, evaluate.__wrapped__, evaluate._taskvec = original_evaluate.__doc__, original_evaluate, True
    evaluator.evaluate, evaluator.print_writeout = evaluate, print_writeout


def _guarded(callback):
    """A registration that finds an lm-eval it does not fit warns once and stands down: it never breaks
    ``import lm_eval``."""

    def guarded():
        try:
            callback()
        except Exception as err:  # noqa: BLE001 - any incompatibility, reported
            import warnings

            warnings.warn(
                f"lm-eval-taskvec: this lm-eval does not fit the start-up hook ({callback.__name__}: "
                f"{err!r}), so hf-taskvec and the tv_* tasks are not registered: install "
                "lm-eval>=0.4.13,<0.5",
                stacklevel=2,
            )

    return guarded


_AFTER_IMPORT = {
    "lm_eval.models": _guarded(register_model),
    "lm_eval.tasks.manager": _guarded(add_task_path),
    "lm_eval.evaluator": _guarded(watch_runs),
}


class _Loader:  # duck-typed: importing importlib.abc would cost ~40 ms at every start-up
    def __init__(self, loader, callback):
        self._loader, self._callback = loader, callback

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        self._callback()

    def __getattr__(self, name):  # get_resource_reader, is_package, ...: whatever the real loader offers
        return getattr(self._loader, name)


class _AfterImportFinder:
    """Wraps the real loader of a few lm_eval modules so a callback runs once they are imported."""

    def find_spec(self, name, path, target=None):
        callback = _AFTER_IMPORT.get(name)
        if callback is None:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(name, path, target)
            if spec is not None and spec.loader is not None:
                spec.loader = _Loader(spec.loader, callback)
                return spec
        return None


def install() -> None:
    """Run our registrations now for lm_eval modules already imported, and after import for the rest."""
    if not any(isinstance(f, _AfterImportFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AfterImportFinder())
    for name, callback in _AFTER_IMPORT.items():
        if name in sys.modules:
            callback()
