"""The task flow, the queue and its worker, the Python API and the CLI."""

from orchestrator.api import Paymaster, Task
from orchestrator.records import Status, TaskRecord

__all__ = ["Paymaster", "Status", "Task", "TaskRecord"]
