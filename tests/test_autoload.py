"""The start-up hook never breaks ``import lm_eval``: an lm-eval it does not fit turns it off with one warning."""

from __future__ import annotations

import os
import subprocess
import sys

SKEWED = """
import warnings
import lm_eval.api.task as task
del task.Task.build_all_requests  # an lm-eval without what the hook wraps
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import lm_eval.tasks
    from lm_eval.tasks import TaskManager
print(sum("does not fit the start-up hook" in str(w.message) for w in caught), TaskManager.__name__)
"""


def test_a_skewed_lm_eval_disables_the_hook_with_one_warning():
    done = subprocess.run([sys.executable, "-c", SKEWED], capture_output=True, text=True, env=os.environ.copy())
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["1", "TaskManager"]
