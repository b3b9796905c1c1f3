"""Evaluation: metrics, predictions (head, label words, generation), the runner and reports."""

from .runner import Settings, evaluate  # noqa: F401
from .report import report  # noqa: F401
