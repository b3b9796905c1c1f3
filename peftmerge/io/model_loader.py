"""Load a base model and its tokenizer: local folders, Hub ids (through the cache) and GGUF files.

The one loader of the package: training, evaluation, search and routing all load their base through
:func:`resolve`, :func:`load_tokenizer` and :func:`load_model` (and put adapters on top themselves).

GGUF files go through transformers' GGUF loading, which dequantizes them to float weights. transformers
refuses to combine GGUF loading with a ``quantization_config``, so QLoRA on a GGUF base first writes a
plain copy of the dequantized model into a cache folder (:func:`peftmerge.io.gguf.plain_folder`) and
quantizes that; every load goes through that copy (it loads in about a second instead of ~20 s). A Hub id is read from its local copy where there is one (the Hugging Face cache, or an
installed offline copy: :mod:`peftmerge.io.base_model`).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

from ..errors import PeftmergeError
from .base_model import local_path
from .checkpoint import refuse_pickle_weights
from .gguf import plain_copy, plain_folder, split

log = logging.getLogger(__name__)


def resolve(model: str, gguf_file: str | None = None) -> tuple[str, str | None]:
    """``(source, None)``: the folder to load ``model`` from. A GGUF file (a ``.gguf`` path, ``gguf_file`` in a
    folder, or a folder holding one ``.gguf`` file and no config) is read through its cached plain copy
    (:func:`peftmerge.io.gguf.plain_folder`); a Hub id from its local copy (:func:`peftmerge.io.base_model.local_path`)
    when there is one. A folder whose weights are only pickles is refused."""
    model = str(model)
    local = model.startswith(("/", "./", "../", "~"))
    p = Path(model).expanduser()
    if not p.exists() and not local and p.suffix != ".gguf":
        p = Path(local_path(model))  # a repo id: its cached snapshot or known offline copy (unchanged if none)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise PeftmergeError(f"base model {model}: no such GGUF file; check the path")
        return str(plain_folder(str(p.parent), p.name)), None
    if local and not p.exists():
        raise PeftmergeError(f"base model {model}: no such folder; check the path (or pass a Hub id)")
    if gguf_file and not local and not (p / gguf_file).is_file() and (p / "config.json").is_file():
        gguf_file = None  # a recorded Hub id whose local copy is a plain folder
    if gguf_file:
        if not (p / gguf_file).is_file():
            raise PeftmergeError(f"base model {model}: no GGUF file {gguf_file!r} in it; check --gguf-file")
        return str(plain_folder(str(p), gguf_file)), None
    refuse_pickle_weights(p)
    src, gguf = split(p) if p.exists() else (model, None)
    return (str(plain_folder(src, gguf)), None) if gguf else (src, None)


def _cannot_load(model: str, e: Exception) -> PeftmergeError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    offline = " (HF_HUB_OFFLINE is set: only cached Hub models load)" if os.environ.get("HF_HUB_OFFLINE") else ""
    return PeftmergeError(
        f"base model {model}: cannot load it{offline}: {first[:200]}; pass a local model folder, a Hub id or a .gguf file"
    )


def load_config(src: str, gguf: str | None = None):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, gguf_file=gguf)
    except (OSError, ValueError, KeyError) as e:
        raise _cannot_load(src, e) from None


def can_generate(config) -> bool:
    """Whether the base is a causal LM (from its saved architectures, else its model type)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_MASKED_LM_MAPPING_NAMES

    archs = config.architectures or []
    if archs:
        return any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    mt = config.model_type
    return mt in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and mt not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def load_tokenizer(src: str, gguf: str | None = None):
    """The base's tokenizer, with a pad token (the EOS token when the base has none, else the unknown token)."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(src, gguf_file=gguf)
    except (OSError, ValueError, KeyError) as e:
        raise _cannot_load(src, e) from None
    if tok.pad_token is None:
        if tok.eos_token is None and tok.unk_token is None:
            raise PeftmergeError(f"base model {src}: its tokenizer has no pad, EOS or unknown token; add a pad token")
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def _device_map() -> dict | None:
    # bitsandbytes 4-bit weights are placed at load time; each process takes its own GPU.
    if torch.cuda.is_available():
        return {"": int(os.environ.get("LOCAL_RANK", 0))}
    return None


@contextmanager
def quiet_report():
    """transformers' load report at error level inside the block (e.g. a base loaded into a fresh head: that the head
    is missing from the checkpoint is what was asked for, not a warning); the caller's verbosity after it."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)


def load_model(src: str, gguf: str | None, shape: str, labels: list[str] | None = None, quantize_4bit: bool = False,
               dtype: str = "auto", pad_token_id: int | None = None, num_labels: int | None = None):
    """The base as a causal LM (text2text) or as a sequence classifier (classify): with a fresh head for ``labels``
    (or ``num_labels`` unnamed ones), else with the base's own head. ``dtype`` "auto" is float32."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, BitsAndBytesConfig

    kwargs: dict = {"dtype": torch.float32 if dtype == "auto" else getattr(torch, dtype)}
    if quantize_4bit:
        if gguf:
            src, gguf = str(plain_folder(src, gguf)), None
        compute = torch.bfloat16 if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else torch.float32
        # A classification head stays in full precision: it is trained whole (modules_to_save).
        skip = {"llm_int8_skip_modules": ["classifier", "score"]} if shape == "classify" else {}
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=compute,
            **skip,
        )
        kwargs["device_map"] = _device_map()
    if shape == "classify":
        if labels:
            kwargs.update(ignore_mismatched_sizes=True, num_labels=len(labels), id2label=dict(enumerate(labels)), label2id={l: i for i, l in enumerate(labels)})
        elif num_labels is not None:
            kwargs.update(ignore_mismatched_sizes=True, num_labels=num_labels)
        auto = AutoModelForSequenceClassification
    else:
        auto = AutoModelForCausalLM
    try:
        fresh_head = shape == "classify" and (bool(labels) or num_labels is not None)
        with quiet_report() if fresh_head else nullcontext():
            model = auto.from_pretrained(src, gguf_file=gguf, **kwargs)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise _cannot_load(src, e) from None
    if gguf:
        model = plain_copy(model)
    if pad_token_id is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = pad_token_id
    return model
