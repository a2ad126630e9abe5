"""The task class of every tv_* task (``class: !function tv_task.TaskVectorTask`` in _tv_template_yaml).

lm-eval's ConfigurableTask warns "Custom kwargs can be passed to `--metadata`" for every task whose data comes
from a ``custom_dataset`` function, and passes that function the run's metadata (model args included). Our
loader needs only its ``dataset_kwargs`` (which file to read), so this class loads with those alone: no warning
for a setting these tasks do not have.
"""

from lm_eval.api.task import ConfigurableTask


class TaskVectorTask(ConfigurableTask):
    def __init__(self, config=None, **kwargs):
        # lm-eval hands a Python task its whole YAML, `class` key included, which TaskConfig does not know.
        super().__init__(config={k: v for k, v in config.items() if k != "class"}, **kwargs)

    def download(self, dataset_kwargs=None, **kwargs) -> None:
        self.dataset = self.config.custom_dataset(**(self.config.dataset_kwargs or {}))
