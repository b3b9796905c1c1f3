"""Every merge method, one short file each; importing this package registers them all."""

from . import breadcrumbs, cat, dare, magnitude_prune, pcb, task_arithmetic, ties  # noqa: F401
