"""Prompts for label-word scoring, in-context demonstrations and instruction following.

A task ``template`` (from the adapter's ``peftmerge.json``) is a ``str.format`` string over a row's
fields (``text``, ``text_pair``, ``instruction``, ``input``, ...), ``{choices}`` / ``{labels}`` (the label
words joined by ", ") and ``{task}`` (the task name), as ``peftmerge train`` writes them. If it contains ``{label}``, the prompt is the part before it; otherwise the whole template is the
prompt and the label word follows it (after a space unless the prompt ends with whitespace).
"""

from __future__ import annotations

from .tasks import ALPACA, Task


class _Fields(dict):
    def __missing__(self, key):  # a field a row lacks formats as empty
        return ""


def default_template(task: Task) -> str:
    pair = any("text_pair" in r for r in task.rows[:5])
    return "Text: {text}\n" + ("Text 2: {text_pair}\n" if pair else "") + "Answer ({choices}):"


def _fields(task: Task, row: dict) -> _Fields:
    f = _Fields({k: "" if v is None else str(v) for k, v in row.items()})
    f["choices"] = f["labels"] = ", ".join(task.labels or [])
    f["task"] = task.meta.get("task", task.name)
    if task.kind == "generate":
        inp = f.get("input", "")
        f["ctx"] = ", paired with an input that provides further context" if inp else ""
        f["input_block"] = f"### Input:\n{inp}\n\n" if inp else ""
    return f


def prompt_of(task: Task, row: dict) -> str:
    """The prompt of one row (without its answer)."""
    if task.kind == "generate":
        return (task.template or ALPACA).split("{output}")[0].format_map(_fields(task, row))
    template = task.template or default_template(task)
    return template.split("{label}")[0].format_map(_fields(task, row))


def answer_of(prompt: str, answer: str) -> str:
    """The continuation scored/generated after ``prompt``: a space first unless the prompt ends with one."""
    return answer if not prompt or prompt[-1].isspace() else " " + answer


def with_demos(task: Task, row: dict, demos: list[dict]) -> str:
    """``demos`` (prompt + gold answer each, blank-line separated), then the row's prompt."""
    parts = []
    for d in demos:
        p = prompt_of(task, d)
        gold = str(d["label"] if task.kind == "classify" else d["output"])
        parts.append(p + answer_of(p, gold))
    parts.append(prompt_of(task, row))
    return "\n\n".join(parts)
