"""Tasks: what each kind of dense prediction means to every device-side stage.

A task (``semantic``, ``detect``, ``instance``) is read from the model card's ``task`` field and
gives the stages everything that differs between kinds of prediction: the outputs the network
has, how raw outputs become predictions (argmax, or NMS and box mapping), the metric meter, the
parity comparison, the prediction writer and the report columns. Evaluation, parity, reports and
calibration scoring ask the task instead of branching on its name, so adding a task means adding
one module here (and its torch side in :mod:`distill.tasks`). torch-free.
"""
from __future__ import annotations

from typing import Any

from runtime.registry import Registry
from runtime.tasks.base import Task

TASKS: Registry[Task] = Registry("task")
# Cards written before tasks had names said 'semseg'.
LEGACY_NAMES = {"semseg": "semantic", "segmentation": "semantic"}


def task_name(card: dict[str, Any] | None) -> str:
    """The task a model card describes; a card without one (or no card) is semantic."""
    name = str((card or {}).get("task") or "semantic")
    return LEGACY_NAMES.get(name, name)


def get_task(name_or_card: str | dict[str, Any] | None) -> Task:
    """The registered task of a name or a model card."""
    name = name_or_card if isinstance(name_or_card, str) else task_name(name_or_card)
    return TASKS.get(LEGACY_NAMES.get(name, name))


def register(task: Task) -> Task:
    TASKS.register(task.name)(task)
    return task


from runtime.tasks import semantic  # noqa: E402,F401  (registers 'semantic')
from runtime.tasks import detect  # noqa: E402,F401  (registers 'detect' and 'instance')

__all__ = ["TASKS", "Task", "get_task", "task_name"]
