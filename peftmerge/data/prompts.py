"""Prompts for label-word scoring, in-context demonstrations and instruction following.

A task ``template`` (from the adapter's ``peftmerge.json``) is a ``str.format`` string over a row's
fields (``text``, ``text_pair``, ``instruction``, ``input``, ...), ``{choices}`` / ``{labels}`` (the label
words joined by ", ") and ``{task}`` (the task name), as ``peftmerge train`` writes them. If it contains ``{label}``, the prompt is the part before it; otherwise the whole template is the
prompt and the label word follows it (after a space unless the prompt ends with whitespace).
"""

from __future__ import annotations

from .tasks import Task

#: Alpaca's prompt (Taori et al. 2023), the one ``peftmerge train`` uses for instruction rows; ``{ctx}`` and
#: ``{input_block}`` come from :func:`alpaca_fields` (empty for a row without ``input``).
ALPACA = ("Below is an instruction that describes a task{ctx}. Write a response that appropriately completes "
          "the request.\n\n### Instruction:\n{instruction}\n\n{input_block}### Response:\n")
#: The label-word prompt ``peftmerge train`` uses for labelled rows in text2text (recorded in ``peftmerge.json``).
LABEL_TEMPLATE = "Task: {task}. Answer with one of: {labels}.\nText: {text}\nAnswer:"
LABEL_TEMPLATE_PAIR = "Task: {task}. Answer with one of: {labels}.\nText: {text}\nText 2: {text_pair}\nAnswer:"


def alpaca_fields(input: str) -> dict[str, str]:
    """The parts of :data:`ALPACA` that depend on whether the row has an ``input``."""
    if not input:
        return {"ctx": "", "input_block": ""}
    return {"ctx": ", paired with an input that provides further context", "input_block": f"### Input:\n{input}\n\n"}


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """Alpaca's prompt for one instruction row (the "### Input" block only when ``input`` is given)."""
    return ALPACA.format(instruction=instruction, **alpaca_fields(input))


#: Alpaca's prompt with an input, as a template over ``{instruction}`` and ``{input}``.
ALPACA_TEMPLATE = ALPACA.format(instruction="{instruction}", **alpaca_fields("{input}"))


def label_template(pair: bool) -> str:
    """The label-word template of ``peftmerge train`` for single texts or sentence pairs."""
    return LABEL_TEMPLATE_PAIR if pair else LABEL_TEMPLATE


class _Fields(dict):
    def __missing__(self, key):  # a field a row lacks formats as empty
        return ""


def default_template(task: Task) -> str:
    """The prompt of a labelled task that records none (a base model's zero-shot and in-context rows): the same
    label-word template ``peftmerge train`` writes adapters with (:func:`label_template`)."""
    return label_template(any(r.get("text_pair") for r in task.rows[:5]))


def _fields(task: Task, row: dict) -> _Fields:
    f = _Fields({k: "" if v is None else str(v) for k, v in row.items()})
    f["choices"] = f["labels"] = ", ".join(task.labels or [])
    f["task"] = task.meta.get("task", task.name)
    if task.kind == "generate":
        f.update(alpaca_fields(f.get("input", "")))
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
