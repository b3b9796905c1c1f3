"""Task metrics, as pure functions over lists of predictions and references.

- accuracy: fraction of exact label matches;
- macro-F1: the unweighted mean over labels of F1 = 2PR / (P + R) (a label never predicted nor present
  is left out; a label with P + R = 0 counts 0), as scikit-learn's ``f1_score(average="macro")``;
- majority-class rate: the accuracy of always answering the most frequent reference label (a classifier
  scoring below it does worse than a constant answer);
- exact match: string equality after stripping surrounding whitespace;
- ROUGE-L: the F-measure of the longest common subsequence (Lin, 2004), via Google's ``rouge-score``.
"""

from __future__ import annotations

from typing import Sequence


def _check(preds: Sequence, refs: Sequence) -> None:
    if len(preds) != len(refs):
        raise ValueError(f"{len(preds)} predictions for {len(refs)} references")


def accuracy(preds: Sequence[str], refs: Sequence[str]) -> float:
    _check(preds, refs)
    return sum(p == r for p, r in zip(preds, refs)) / len(refs) if refs else 0.0


def macro_f1(preds: Sequence[str], refs: Sequence[str], labels: Sequence[str] | None = None) -> float:
    """Mean F1 over ``labels`` (default: every label seen in ``preds`` or ``refs``)."""
    _check(preds, refs)
    labels = list(labels) if labels is not None else sorted(set(preds) | set(refs))
    scores = []
    for lab in labels:
        tp = sum(p == lab and r == lab for p, r in zip(preds, refs))
        fp = sum(p == lab and r != lab for p, r in zip(preds, refs))
        fn = sum(p != lab and r == lab for p, r in zip(preds, refs))
        if tp + fp + fn == 0:
            continue
        scores.append(2 * tp / (2 * tp + fp + fn))  # = 2PR / (P + R)
    return sum(scores) / len(scores) if scores else 0.0


def majority_rate(refs: Sequence[str]) -> float:
    """The share of the most frequent label among ``refs``: what a constant answer scores."""
    if not refs:
        return 0.0
    counts: dict = {}
    for r in refs:
        counts[r] = counts.get(r, 0) + 1
    return max(counts.values()) / len(refs)


def exact_match(preds: Sequence[str], refs: Sequence[str]) -> float:
    _check(preds, refs)
    return sum(p.strip() == r.strip() for p, r in zip(preds, refs)) / len(refs) if refs else 0.0


def rouge_l(preds: Sequence[str], refs: Sequence[str]) -> float:
    """Mean ROUGE-L F-measure (``rouge_score``, with its default tokenizer, no stemming)."""
    from rouge_score import rouge_scorer

    _check(preds, refs)
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    scores = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(preds, refs)]
    return sum(scores) / len(scores) if scores else 0.0


def classification_metrics(preds, refs, labels=None) -> dict[str, float]:
    return {"accuracy": accuracy(preds, refs), "macro_f1": macro_f1(preds, refs, labels)}


def generation_metrics(preds, refs) -> dict[str, float]:
    return {"exact_match": exact_match(preds, refs), "rougeL": rouge_l(preds, refs)}


def primary(metrics: dict[str, float]) -> float:
    """The metric a task is ranked and normalized by: accuracy, else ROUGE-L."""
    return metrics["accuracy"] if "accuracy" in metrics else metrics["rougeL"]
