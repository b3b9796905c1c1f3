"""Streaming readers and writers: safetensors files, PEFT adapters, atomic output folders."""
