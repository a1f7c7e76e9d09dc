"""The tasks a run can be (mim.engine.task.Task): `mim pretrain`, `mim linprobe`, `mim finetune`
and `mim segprobe` run the registered ones; `mim train --task NAME_OR_PATH` runs any, your own as
`package.module:Class` (docs/extending.md)."""

from __future__ import annotations

from mim.engine.task import Task
from mim.registry import Registry

TASKS = Registry("task", "--task", base=Task)


def task_class(spec: str) -> type:
    """The task registered as `spec` or named by a plug-in path; the built-in ones are registered
    when their modules are imported."""
    import mim.tasks.classify  # noqa: F401
    import mim.tasks.pretrain  # noqa: F401
    import mim.tasks.segment  # noqa: F401

    return TASKS.get(spec)
