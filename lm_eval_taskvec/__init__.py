"""lm-eval-taskvec: evaluate "In-Context Learning Creates Task Vectors" (Hendel et al., 2023) in lm-eval.

``import lm_eval_taskvec`` is cheap (no torch): it makes lm-eval know the ``hf-taskvec`` model and the
``tv_*`` tasks. The model class loads on first use.

The layers of the package, each importing only those listed before it (and never ``model``):

- ``settings`` (model arguments, parsed; no torch), ``contexts`` (S and x of a request, dummy queries), ``chat``
  (S and x of a chat-template context, from the turns the model rendered it from),
  ``layers`` (decoder blocks, every hook, ``Intervention``), ``extraction`` (prefix-shared forward passes),
  ``identity`` (weights fingerprint), ``handoff`` (what HFLM's callbacks hand each other);
- ``theta`` (``ThetaKey``; ``ThetaStore``, the one owner of θ), ``thetafile`` (the θ file format);
- ``planning`` (``Plan``: a request's query, θ key and block; plans -> interventions);
- ``selection`` (``layer=auto``: dev documents, the sweep, the layer cache), which talks to the model only
  through ``selection.interface.SweepModel``;
- ``preflight`` (every task of a run checked at the model's first call: refusals before anything runs, and what
  ``--write_out`` shows of the patched modes);
- ``model`` (``TaskVectorLM``: HFLM overrides, each owning no state but what it hands to the next callback);
- above the model: ``comparison`` (``taskvec compare``), ``analyses``, ``cli``, ``sweep_report``, ``figures``.

Nothing below ``model`` imports it or reads a private attribute of it (``lm._*``); tests/test_layout.py checks.
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
