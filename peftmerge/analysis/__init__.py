"""Diagnostics and measurements of adapters: conflict statistics (:mod:`.inspect`) and the layer-input Gram
matrices that data-aware merges read (:mod:`.grams`)."""
