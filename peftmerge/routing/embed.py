"""Query texts and query embeddings.

A query record (one JSON object per line) becomes a query the same way everywhere: ``text`` (+
``text_pair``: the pair ``(text, text_pair)``, encoded as a pair as the classifiers were trained, with
the tokenizer's separator and token types; a tokenizer without a separator token embeds it joined by a
newline), else ``instruction`` (+ ``input``), else ``input`` / ``query`` / ``prompt``. Its embedding is
the mean over non-padding tokens of one hidden state (``layer``: 0 = the first layer's input, i.e. token +
position + token-type embeddings; -1 = last) of the base model or of a sentence-embedding model. Layers
above ``layer`` are not run. Where the first layer's input is a plain token-embedding lookup (Llama-like
models: checked on the first batch), layer 0 is computed as one ``embedding_bag`` per batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PeftmergeError
from ..io.meta import read_jsonl

TEXT_FIELDS = ("text", "instruction", "input", "query", "prompt")


def record_text(rec: dict, where: str = "record") -> str:
    """The query text of one record."""
    if not isinstance(rec, dict):
        raise PeftmergeError(f"{where}: not a JSON object; each line must be like {{\"text\": \"...\"}}")
    if rec.get("text") is not None:
        return str(rec["text"]) + (f"\n{rec['text_pair']}" if rec.get("text_pair") else "")
    if rec.get("instruction") is not None:
        return str(rec["instruction"]) + (f"\n{rec['input']}" if rec.get("input") else "")
    for key in ("input", "query", "prompt"):
        if rec.get(key) is not None:
            return str(rec[key])
    raise PeftmergeError(f"{where}: no query text; give one of the fields {', '.join(TEXT_FIELDS)}")


def record_query(rec: dict, where: str = "record") -> str | tuple[str, str]:
    """The query of one record: ``(text, text_pair)`` for a sentence pair, else its text."""
    text = record_text(rec, where)
    if rec.get("text") is not None and rec.get("text_pair"):
        return str(rec["text"]), str(rec["text_pair"])
    return text


def as_query(sample) -> str | tuple[str, str]:
    """A stored sample (a string, or a ``[text, text_pair]`` list) as a query."""
    if isinstance(sample, (list, tuple)) and len(sample) == 2:
        return str(sample[0]), str(sample[1])
    return str(sample)


def query_text(query: str | tuple[str, str]) -> str:
    """One string for a query (a pair joined by a newline), for prompts and logs."""
    return query if isinstance(query, str) else f"{query[0]}\n{query[1]}"


def encode(tokenizer, queries: list, max_length: int | None = None):
    """Tokenize and pad ``queries`` (strings or ``(text, text_pair)`` pairs) into one batch of tensors."""
    if all(isinstance(q, str) for q in queries):
        return tokenizer(list(queries), return_tensors="pt", padding=True, truncation=max_length is not None,
                         max_length=max_length)
    rows = [tokenizer(*((q,) if isinstance(q, str) else q), truncation=max_length is not None,
                      max_length=max_length) for q in queries]
    return tokenizer.pad(rows, return_tensors="pt")


def read_queries(path: str | Path) -> list[dict]:
    """Records of a JSONL file (:func:`peftmerge.io.meta.read_jsonl`), each checked to hold a query text
    (one-line error naming the bad line)."""
    rows = read_jsonl(path)
    for n, rec in enumerate(rows, 1):
        record_text(rec, f"{path}:{n}")
    return rows


class _Stop(Exception):
    def __init__(self, hidden):
        self.hidden = hidden


def _layers(backbone: nn.Module, n: int) -> nn.ModuleList:
    for m in backbone.modules():
        if isinstance(m, nn.ModuleList) and len(m) == n:
            return m
    raise PeftmergeError(f"{type(backbone).__name__}: cannot find its {n} transformer layers; use --layer -1")


def backbone_of(model: nn.Module) -> nn.Module:
    """The transformer without its LM / classification head (``model.base_model`` in transformers)."""
    return getattr(model, "base_model", model)


@torch.no_grad()
def pooled_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, layer: int = -1,
                  token_type_ids: torch.Tensor | None = None):
    """Mean-pooled hidden state ``layer`` of ``model`` (n, d); stops after that layer."""
    backbone = backbone_of(model)
    n_layers = model.config.num_hidden_layers
    if layer < -1 or layer > n_layers:
        raise PeftmergeError(f"layer {layer} is out of range for a {n_layers}-layer model; pick 0..{n_layers} or -1")
    handle = None
    if layer == 0:  # the input of the first layer: token (+ position, token type) embeddings

        def pre_hook(_m, args, kwargs):
            raise _Stop(args[0] if args else kwargs["hidden_states"])

        handle = _layers(backbone, n_layers)[0].register_forward_pre_hook(pre_hook, with_kwargs=True)
    elif layer != -1 and layer != n_layers:

        def hook(_m, _inp, out):
            raise _Stop(out[0] if isinstance(out, tuple) else out)

        handle = _layers(backbone, n_layers)[layer - 1].register_forward_hook(hook)
    try:
        extra = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        hidden = backbone(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
    except _Stop as stop:
        hidden = stop.hidden
    finally:
        if handle is not None:
            handle.remove()
    mask = attention_mask.to(hidden.dtype).unsqueeze(1)  # (n, 1, T)
    return (torch.bmm(mask, hidden).squeeze(1) / mask.sum(2).clamp(min=1)).float()  # (n, d)


class Embedder:
    """``embed(queries) -> (n, d)``: pooled hidden states of ``model`` at ``layer``, in batches; a query is a
    string or a ``(text, text_pair)`` pair."""

    def __init__(self, model, tokenizer, layer: int = -1, batch_size: int | None = None, max_length: int = 256,
                 pairs: str = "joint"):
        self.model, self.tokenizer, self.layer = model, tokenizer, int(layer)
        # layer 0 is an embedding lookup: large batches cost no attention, and fewer calls cost less overhead
        self.batch_size = batch_size or (256 if self.layer == 0 else 16)
        self.max_length, self.pairs = max_length, pairs
        self._lookup: bool | None = None  # layer 0 is a plain embedding lookup (see :meth:`_bag`)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token

    def __call__(self, queries: list) -> torch.Tensor:
        """(n, d) with ``pairs="joint"``; (n, 2d) with ``"segments"``: [pooled text; pooled text_pair], the
        second half zero for a single text, so a pair's two parts (e.g. RTE's premise and hypothesis) and
        the fact that it is a pair stay visible instead of averaging into one mean."""
        if self.pairs == "segments":
            first = self._embed([q if isinstance(q, str) else q[0] for q in queries])
            second = torch.zeros_like(first)
            at = [i for i, q in enumerate(queries) if not isinstance(q, str)]
            if at:
                second[at] = self._embed([queries[i][1] for i in at])
            return torch.cat([first, second], dim=1)
        return self._embed(queries)

    def _embed(self, queries: list) -> torch.Tensor:
        if self.tokenizer.sep_token is None:  # no pair encoding (decoder LMs glue the two texts): join by a newline
            queries = [query_text(q) for q in queries]
        out = []
        for i in range(0, len(queries), self.batch_size):
            enc = encode(self.tokenizer, list(queries[i:i + self.batch_size]), self.max_length)
            if self.layer == 0 and self._lookup is None:  # decided once, on the first batch
                out.append(self._pooled(enc))
                self._lookup = bool(torch.allclose(out[-1], self._bag(enc), rtol=1e-4, atol=1e-5))
            elif self._lookup:
                out.append(self._bag(enc))
            else:
                out.append(self._pooled(enc))
        return torch.cat(out)

    def _pooled(self, enc) -> torch.Tensor:
        return pooled_hidden(self.model, enc["input_ids"], enc["attention_mask"], self.layer, enc.get("token_type_ids"))

    @torch.no_grad()
    def _bag(self, enc) -> torch.Tensor:
        """Mean of the input token embeddings, as one ``embedding_bag`` (no (n, T, d) tensor): the first layer's
        input of a model whose embeddings are a plain lookup (Llama-like; BERT adds positions and a LayerNorm)."""
        weight = backbone_of(self.model).get_input_embeddings().weight
        mask = enc["attention_mask"]
        summed = F.embedding_bag(enc["input_ids"], weight, per_sample_weights=mask.to(weight.dtype), mode="sum")
        return (summed / mask.sum(1, keepdim=True).clamp(min=1)).float()  # (n, d)
