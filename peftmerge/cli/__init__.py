"""Command line: thin click layers over the library functions of the same name."""
