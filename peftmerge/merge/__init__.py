"""Merging LoRA adapters (and full fine-tunes) into one adapter or one full model.

- :mod:`.methods`: the methods, one file each, pure math over tensors; :mod:`.registry`: what a method declares
  (its parameters, its paper, how it may be computed) and the registry that finds them;
- :mod:`.engine`: how the methods are computed fast (row blocks, compiled kernels, selection, Krylov SVD);
- :mod:`.execute`: the one dispatch from a method to its computation, for adapter and full-model outputs;
- :mod:`.combine` (adapters) and :mod:`.full_model` (``--base``): the drivers, from inputs (:mod:`.plan`) to the
  written output; :mod:`.recipe`, :mod:`.mergekit_recipe`, :mod:`.mergekit_methods`: YAML recipes in mergekit's
  dialect; :mod:`.biases`, :mod:`.tied`, :mod:`.vocab`: bias updates, tied embeddings, tokenizers;
- :mod:`.extract`: a LoRA adapter from a full fine-tune.
"""
