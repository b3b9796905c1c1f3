"""Every merge method, one short file each; importing this package registers them all."""

from . import breadcrumbs, cat, dare, iso_c, magnitude_prune, pcb, regmean, task_arithmetic, ties, tsv  # noqa: F401
