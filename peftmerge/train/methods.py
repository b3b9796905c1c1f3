"""The one registry of training methods: a name -> a function that makes a base model trainable.

Each entry names its paper. Only the LoRA family (``lora``, ``qlora``, ``dora``, ``lori``) writes adapters that the
merge methods can combine; the others train, evaluate and save for comparison.

- lora: LoRA, Hu et al. 2021 (arXiv:2106.09685), W' = W + (alpha/r) B A; defaults r=16, alpha=32, dropout 0.05.
  ``rslora`` scales by alpha/sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732).
- qlora: QLoRA, Dettmers et al. 2023 (arXiv:2305.14314): LoRA over a frozen 4-bit NF4 base (bitsandbytes).
- dora: DoRA, Liu et al. 2024 (arXiv:2402.09353): W' = m (W + B A) / ||W + B A||_c.
- lori: LoRI, Zhang et al. 2025 (arXiv:2504.07448): dW = (alpha/r) (B ⊙ M) A with A a frozen random projection
  and B sparse under a task mask M calibrated by a first dense phase (:mod:`peftmerge.train.lori`); merges
  like ``lora``.
- prompt_tuning: Lester et al. 2021 (arXiv:2104.08691): ``num_virtual_tokens`` trained soft-prompt embeddings.
- ia3: (IA)^3, Liu et al. 2022 (arXiv:2205.05638): learned vectors rescaling keys, values and FFN activations.
- bitfit: Ben Zaken et al. 2021 (arXiv:2106.10199): train only the bias terms (and the classification head).
- llama_adapter: LLaMA-Adapter, Zhang et al. 2023 (arXiv:2303.16199): zero-gated adaption prompts in the top
  ``adapter_layers`` layers (PEFT's adaption prompt; Llama/Mistral causal LMs only).
- full: full fine-tuning, every weight trained (no adapter): with ``--shape classify`` vanilla fine-tuning
  with a head (Devlin et al. 2019, arXiv:1810.04805); in text2text pattern-based fine-tuning, a prompt
  pattern and the label words as the answer (PET, Schick & Schuetze 2021, arXiv:2001.07676). Saves a whole
  model (``save_pretrained``, with the tokenizer), so it suits small bases.
- context_distillation: Snell et al. 2022 (arXiv:2209.15189), Askell et al. 2021 (arXiv:2112.00861): a LoRA
  adapter trained without labels so that base + LoRA *without* a prompt matches the base *with* it,
  min KL(p_base(y | prompt, x) || p_lora(y | x)) (:mod:`peftmerge.train.distill`); merges like ``lora``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import PeftmergeError
from ..registry import Registry

HEAD_NAMES = ("classifier", "score")  # sequence-classification heads (BERT-like, decoder-like)
BITFIT_FILE = "bitfit_model.safetensors"


@dataclass(frozen=True)
class Method:
    """A registered method: ``build(model, config, task_type)`` returns the model ready to train."""

    name: str
    paper: str
    build: Callable
    mergeable: bool = False
    """Whether ``peftmerge combine`` can merge its adapters (the LoRA family)."""
    quantize_4bit: bool = False
    """Load the base in 4-bit NF4 (bitsandbytes) before ``build``."""
    causal_only: bool = False
    """Only for text2text on a causal LM."""
    distill: bool = False
    """Trained by context distillation (:mod:`peftmerge.train.distill` builds its rows, examples and Trainer)."""
    masked: bool = False
    """B is trained under a task mask that a first dense phase calibrates (:func:`peftmerge.train.lori.calibrate`)
    when ``density`` < 1."""


REGISTRY: Registry[Method] = Registry("method", "peftmerge.train.methods", ordered=True)


def register(name: str, paper: str, **kwargs) -> Callable:
    """Decorator: add ``build`` to the registry under ``name``."""

    def deco(build: Callable) -> Callable:
        REGISTRY.add(name, Method(name=name, paper=paper, build=build, **kwargs))
        return build

    return deco


def names() -> list[str]:
    """The registered method names."""
    return REGISTRY.names()


def get(name: str) -> Method:
    """The method called ``name``; an unknown name gets an error listing the valid ones."""
    return REGISTRY.get(name)


def _lora_config(config, task_type: str, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=config.r, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=config.target_modules,
        use_rslora=config.rslora, use_dora=use_dora, task_type=task_type,
    )


def _peft(model, peft_config):
    from peft import get_peft_model

    try:
        peft_model = get_peft_model(model, peft_config)
    except ValueError as e:  # e.g. target modules not found in the model
        raise PeftmergeError(f"cannot apply {peft_config.peft_type.value}: {str(e).splitlines()[0]}") from None
    return offline_saves(peft_model)


def offline_saves(model):
    """``model`` whose ``save_pretrained`` (the final save and the Trainer's checkpoints) says whether the embedding
    matrices go in, so PEFT never asks the Hub whether the vocabulary was resized (it never is here): only where an
    embedding layer is adapted, as PEFT's own rule."""
    model.save_pretrained = functools.partial(type(model).save_pretrained, model,
                                              save_embedding_layers=embeddings_adapted(model))
    return model


@register("lora", "https://arxiv.org/abs/2106.09685", mergeable=True)
def build_lora(model, config, task_type: str):
    return _peft(model, _lora_config(config, task_type))


@register("qlora", "https://arxiv.org/abs/2305.14314", mergeable=True, quantize_4bit=True)
def build_qlora(model, config, task_type: str):
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing)
    keep_trainable_layout(model)
    return _peft(model, _lora_config(config, task_type))


def keep_trainable_layout(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference during evaluation.

    On CPUs with AVX512-BF16, ``Linear4bit`` converts its weights in place to an inference-only layout the
    first time it runs in eval mode without gradients; training after an evaluation would then go through
    the inference kernel. Evaluation and training must see the same layout.
    """
    import bitsandbytes as bnb

    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


@register("dora", "https://arxiv.org/abs/2402.09353", mergeable=True)
def build_dora(model, config, task_type: str):
    return _peft(model, _lora_config(config, task_type, use_dora=True))


@register("lori", "https://arxiv.org/abs/2504.07448", mergeable=True, masked=True)
def build_lori(model, config, task_type: str):
    from .lori import freeze_a

    model = _peft(model, _lora_config(config, task_type))
    freeze_a(model)  # A stays the random projection it was initialised to
    return model


@register("prompt_tuning", "https://arxiv.org/abs/2104.08691")
def build_prompt_tuning(model, config, task_type: str):
    from peft import PromptTuningConfig

    return _peft(model, PromptTuningConfig(num_virtual_tokens=config.num_virtual_tokens, task_type=task_type))


@register("ia3", "https://arxiv.org/abs/2205.05638")
def build_ia3(model, config, task_type: str):
    from peft import IA3Config

    custom = config.target_modules
    kwargs = {} if custom is None else {"target_modules": custom, "feedforward_modules": []}
    return _peft(model, IA3Config(task_type=task_type, **kwargs))


@register("llama_adapter", "https://arxiv.org/abs/2303.16199", causal_only=True)
def build_llama_adapter(model, config, task_type: str):
    from peft import AdaptionPromptConfig

    layers = min(config.adapter_layers, model.config.num_hidden_layers)
    return _peft(model, AdaptionPromptConfig(adapter_len=config.num_virtual_tokens, adapter_layers=layers,
                                             task_type=task_type))


@register("bitfit", "https://arxiv.org/abs/2106.10199")
def build_bitfit(model, config, task_type: str):
    n = 0
    for name, p in model.named_parameters():
        is_head = name.split(".")[0] in HEAD_NAMES
        p.requires_grad_(name.endswith(".bias") or is_head)
        n += name.endswith(".bias")
    if n == 0:
        raise PeftmergeError(
            f"bitfit: {type(model).__name__} has no bias parameters to train; use a model with biases or another method"
        )
    return model


@register("full", "https://arxiv.org/abs/2001.07676")
def build_full(model, config, task_type: str):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


@register("context_distillation", "https://arxiv.org/abs/2209.15189", mergeable=True, causal_only=True, distill=True)
def build_context_distillation(model, config, task_type: str):
    return build_lora(model, config, task_type)  # the student: base + LoRA; the teacher: the same, adapter off


def trainable_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters by name (what a BitFit run saves)."""
    return {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_trained(model, method: Method, out: Path, tokenizer=None) -> None:
    """Save what was trained: a PEFT adapter (``save_pretrained``), for BitFit the biases + head, for a full
    fine-tune the whole model and ``tokenizer`` (a folder any transformers code loads)."""
    if method.name == "bitfit":
        from safetensors.torch import save_file

        save_file(trainable_state(model), str(out / BITFIT_FILE), metadata={"format": "pt", "method": "bitfit"})
    elif method.name == "full":
        model.save_pretrained(str(out))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(out))
    else:
        model.save_pretrained(str(out))  # built by _peft: no Hub lookup (offline_saves)


def embeddings_adapted(model) -> bool:
    """Whether a PEFT model adapts one of its embedding layers."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(m, BaseTunerLayer) and isinstance(m.get_base_layer(), torch.nn.Embedding)
               for m in model.modules())
