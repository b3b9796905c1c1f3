"""Sharing on the Hugging Face Hub: upload an output folder with its card (:mod:`.push`)."""
