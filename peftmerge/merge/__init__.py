"""Merging: one registry of methods (pure tensor math) and the streaming ``combine`` driver."""
