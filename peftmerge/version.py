"""The version of peftmerge (one place: the package, its cards and its outputs read it here)."""

__version__ = "0.1.0"
