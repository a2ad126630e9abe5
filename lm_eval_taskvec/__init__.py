"""lm-eval-taskvec: evaluate "In-Context Learning Creates Task Vectors" (Hendel et al., 2023) in lm-eval.

``import lm_eval_taskvec`` is cheap (no torch): it makes lm-eval know the ``hf-taskvec`` model and the
``tv_*`` tasks. The model class loads on first use.
"""

from lm_eval_taskvec._autoload import install as _install

__version__ = "0.1.0"
__all__ = ["TaskVectorLM", "compare", "task_dir"]

_install()


def __getattr__(name):
    if name == "TaskVectorLM":
        from lm_eval_taskvec.model import TaskVectorLM

        return TaskVectorLM
    if name == "compare":
        from lm_eval_taskvec.comparison import compare

        return compare
    if name == "task_dir":
        from lm_eval_taskvec.tasks import task_dir

        return task_dir
    raise AttributeError(f"module 'lm_eval_taskvec' has no attribute {name!r}")
