"""Context distillation: Snell et al. 2022 (arXiv:2209.15189), Askell et al. 2021 (arXiv:2112.00861).

A LoRA adapter learns to behave, without a (long) prompt P of instructions and demonstrations, as the
base model behaves with it. No labels are needed:

    teacher  p_T(. | P, x)   the base model with P before every input x (the same model, LoRA switched off:
                             ``disable_adapter``, no second copy in memory)
    student  p_S(. | x)      base + LoRA, on x alone
    loss     generation:  mean over answer tokens y_t of KL(p_T(. | P, x, y_<t) || p_S(. | x, y_<t))
             label words: mean over rows of KL(q_T || q_S), q(l) = softmax over labels l of log p(" l" | ., x)

Answers: a row's own completion when it has one, else the teacher's greedy completion (at most
``GENERATE_TOKENS`` tokens), made once before training. Text rows (``text``, ``text_pair``) take the label
words from ``--labels`` (or ``task.json``) and the task template, as text2text training does.
"""

from __future__ import annotations

import contextlib
import json
import random
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import Trainer

from ..data.prompts import alpaca_prompt
from ..errors import PeftmergeError
from .data import TaskData, read_rows
from .examples import IGNORE, Collator

GENERATE_TOKENS = 64
KEYS = {"labelled": "text", "alpaca": "instruction", "prompt": "prompt"}  # the field that decides each format


# --- rows ------------------------------------------------------------------------------------------------

def _format(rows: list[dict], where: str) -> str:
    fmt = next((f for f, key in KEYS.items() if key in rows[0]), None)
    if fmt is None:
        raise PeftmergeError(f"data {where} row 1: fields {sorted(rows[0])} match no format; context distillation "
                             "reads text (+ text_pair), prompt (+ completion) or instruction (+ input, output) rows")
    for n, row in enumerate(rows, 1):
        if row.get(KEYS[fmt]) is None:
            raise PeftmergeError(f"data {where} row {n}: missing field {KEYS[fmt]!r} (the first row has {fmt} format)")
    return fmt


def load_task(config) -> TaskData:
    """Unlabelled rows for context distillation (a file, or a task folder with train.jsonl + validation.jsonl)."""
    if not config.teacher_prompt:
        raise PeftmergeError("--method context_distillation needs --teacher-prompt FILE: the prompt the adapter "
                             "learns to do without")
    if not Path(config.teacher_prompt).is_file():
        raise PeftmergeError(f"--teacher-prompt {config.teacher_prompt}: no such file; pass a text file")
    if config.packing:
        raise PeftmergeError("--packing does not apply to context distillation; drop it")
    data, validation = Path(config.data), config.validation
    if data.is_dir() and (data / "train.jsonl").is_file():
        validation = validation or (str(data / "validation.jsonl") if (data / "validation.jsonl").is_file() else None)
        data = data / "train.jsonl"
    rng = random.Random(config.seed)
    train = read_rows(data)
    if config.max_samples and len(train) > config.max_samples:
        train = rng.sample(train, config.max_samples)
    fmt = _format(train, str(data))
    if validation:
        val = read_rows(validation)
        if _format(val, str(validation)) != fmt:
            raise PeftmergeError(f"data {validation}: rows are not in the {fmt} format of {data}; use matching files")
    elif config.val_fraction > 0:
        train = rng.sample(train, len(train))
        n_val = max(1, round(len(train) * config.val_fraction))
        val, train = train[:n_val], train[n_val:]
    else:
        val = []
    if config.max_eval_samples and len(val) > config.max_eval_samples:
        val = random.Random(config.seed).sample(val, config.max_eval_samples)
    labels = list(config.labels) if config.labels else None
    info = data.parent / "task.json"
    if fmt == "labelled" and labels is None and info.is_file():
        labels = json.loads(info.read_text()).get("labels")
    if fmt == "labelled" and (not labels or len(labels) < 2):
        raise PeftmergeError(f"data {data}: text rows are distilled over label words; pass --labels a,b (or put a "
                             "task.json with 'labels' beside the data)")
    return TaskData(train=train, validation=val, format=fmt, labels=[str(x) for x in labels] if labels else None,
                    source=str(data))


# --- examples --------------------------------------------------------------------------------------------

def _prompt(row: dict, fmt: str, template: str | None, task: str, labels: list[str] | None) -> tuple[str, str | None]:
    if fmt == "labelled":
        return template.format(task=task, labels=", ".join(labels), text=row["text"],
                               text_pair=row.get("text_pair") or ""), None
    if fmt == "alpaca":
        return alpaca_prompt(row["instruction"], row.get("input") or ""), row.get("output")
    return str(row["prompt"]), row.get("completion")


def examples(rows: list[dict], task: TaskData, tokenizer, config, shape: str, template: str | None) -> list[dict]:
    """One example per row: the student's and the teacher's token ids (the same ids after the teacher's prompt)
    and the answers to score: every label word (+ EOS), the row's completion (+ EOS), or None (generated later)."""
    teacher = tokenizer(Path(config.teacher_prompt).read_text().strip() + "\n\n", add_special_tokens=False)["input_ids"]
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    label_answers = [tokenizer(" " + label, add_special_tokens=False)["input_ids"] + eos for label in task.labels or []]
    out = []
    for row in rows:
        text, completion = _prompt(row, task.format, template, config.task, task.labels)
        full = tokenizer(text, add_special_tokens=True)["input_ids"]
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        head = full[:len(full) - len(body)] if full[len(full) - len(body):] == body else []  # e.g. BOS
        if task.format == "labelled":
            answers = label_answers
        else:
            answers = None if completion is None else [tokenizer(str(completion), add_special_tokens=False)["input_ids"] + eos]
        reserve = max(len(a) for a in answers) if answers else min(GENERATE_TOKENS, config.max_length // 2)
        room = config.max_length - len(head) - reserve
        if len(body) > max(room, 2):  # cut the input in the middle: its start and its answer cue both stay
            keep = max(room, 2)
            body = body[:keep // 2] + body[len(body) - (keep - keep // 2):]
        out.append({"student": head + body, "teacher": head + teacher + body, "answers": answers,
                    "label_words": task.format == "labelled"})
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, examples: list[dict], max_length: int) -> None:
    """Fill in the answers of prompt-only examples: the teacher's greedy completion (adapter off, eval mode)."""
    todo = [ex for ex in examples if ex["answers"] is None]
    if not todo:
        return
    device = next(p.device for p in model.parameters())
    eos = tokenizer.eos_token_id
    with teacher_mode(model):
        for ex in tqdm(todo, desc="teacher answers", leave=False):
            ids = torch.tensor([ex["teacher"]], device=device)
            new = max(1, min(GENERATE_TOKENS, max_length - len(ex["student"])))
            seq = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                 do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos)
            answer = seq[0, ids.shape[1]:].tolist()
            if eos is not None and eos in answer:
                answer = answer[:answer.index(eos) + 1]
            ex["answers"] = [answer or [eos if eos is not None else tokenizer.pad_token_id]]


@contextlib.contextmanager
def teacher_mode(model):
    """The base model alone, in eval mode (no dropout): the teacher."""
    was_training = model.training
    model.eval()
    try:
        with model.disable_adapter():
            yield model
    finally:
        model.train(was_training)


class DistillCollator:
    """Each example becomes one student and one teacher sequence per answer, right-padded; ``labels`` are the
    answer tokens (-100 elsewhere), so position t - 1 predicts answer token t on both sides."""

    def __init__(self, pad_id: int):
        self.pad = Collator(pad_id)

    def __call__(self, batch: list[dict]) -> dict[str, torch.Tensor]:
        def side(key):
            seqs = [{"input_ids": ex[key] + a, "attention_mask": [1] * (len(ex[key]) + len(a)),
                     "labels": [IGNORE] * len(ex[key]) + a} for ex in batch for a in ex["answers"]]
            return self.pad(seqs)

        student, teacher = side("student"), side("teacher")
        return {**student, **{f"teacher_{k}": v for k, v in teacher.items()},
                "answers_per_row": torch.tensor(len(batch[0]["answers"]))}


# --- loss --------------------------------------------------------------------------------------------------

def kl_loss(s_logits: torch.Tensor, t_logits: torch.Tensor, s_labels: torch.Tensor, t_labels: torch.Tensor,
            answers_per_row: int, label_words: bool) -> torch.Tensor:
    """KL(teacher || student) over the answer tokens (vocabulary distributions), or over the label words.

    s_logits (N, Ts, V), t_logits (N, Tt, V); *_labels (N, T*) hold the answer tokens, -100 elsewhere; both
    sides have the same answer tokens in the same order. N = rows x answers_per_row.
    """
    s_mask, t_mask = s_labels[:, 1:] != IGNORE, t_labels[:, 1:] != IGNORE
    s_logp = torch.log_softmax(s_logits[:, :-1][s_mask].float(), dim=-1)  # (n answer tokens, V)
    t_logp = torch.log_softmax(t_logits[:, :-1][t_mask].float(), dim=-1)
    if not label_words:
        return (t_logp.exp() * (t_logp - s_logp)).sum(-1).mean()
    target = s_labels[:, 1:][s_mask].unsqueeze(-1)
    seq = s_mask.nonzero()[:, 0]  # the sequence of each answer token

    def label_logp(logp):  # log q(l): the label words' sequence log-probs, normalised over the labels
        scores = torch.zeros(s_labels.shape[0], dtype=logp.dtype, device=logp.device)
        scores = scores.index_add(0, seq, logp.gather(-1, target).squeeze(-1))
        return torch.log_softmax(scores.view(-1, answers_per_row), dim=-1)  # (rows, labels)

    qs, qt = label_logp(s_logp), label_logp(t_logp)
    return (qt.exp() * (qt - qs)).sum(-1).mean()


class DistillTrainer(Trainer):
    """``Trainer`` whose loss is the KL of the student (the model) to the teacher (the model, adapter off)."""

    def __init__(self, *args, label_words: bool = False, **kwargs):
        super().__init__(*args, **kwargs)
        self.label_words = label_words
        self.model_accepts_loss_kwargs = False  # a per-batch mean: Trainer averages it over accumulation steps

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        peft_model = self.accelerator.unwrap_model(model)
        with torch.no_grad(), teacher_mode(peft_model):
            t_logits = peft_model(input_ids=inputs["teacher_input_ids"],
                                  attention_mask=inputs["teacher_attention_mask"]).logits
        s_logits = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits
        loss = kl_loss(s_logits, t_logits, inputs["labels"], inputs["teacher_labels"],
                       int(inputs["answers_per_row"]), self.label_words)
        return (loss, {"logits": s_logits}) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def make_trainer(model, tokenizer, train_examples, val_examples, config, shape: str, left_pad: bool = False,
                 progress: bool = True):
    """The :class:`DistillTrainer` (the teacher's answers to prompt-only rows generated first)."""
    from transformers import EarlyStoppingCallback, PrinterCallback

    from .trainer import mark_complete, training_args

    generate_answers(model, tokenizer, train_examples + val_examples, config.max_length)
    callbacks = [mark_complete()]
    if config.early_stopping and val_examples:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.early_stopping))
    trainer = DistillTrainer(
        model=model, args=training_args(config, bool(val_examples), shape, progress), train_dataset=train_examples,
        eval_dataset=val_examples or None, data_collator=DistillCollator(tokenizer.pad_token_id),
        processing_class=tokenizer, callbacks=callbacks, label_words=train_examples[0]["label_words"],
    )
    if not progress:
        trainer.remove_callback(PrinterCallback)
    return trainer
