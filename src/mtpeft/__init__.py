"""mtpeft: many small task adapters on one frozen transformer backbone.

Train a LoRA adapter and head per task, evaluate with the task's real metric, save in
the PEFT layout, and serve every task from one process with mixed-task batches.
"""

from mtpeft.model import MultiTaskModel
from mtpeft.tasks.spec import TaskSpec

__all__ = ["MultiTaskModel", "TaskSpec"]
__version__ = "0.1.0"
