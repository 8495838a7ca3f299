"""The package's version (here, so that every layer may name it)."""

__version__ = "0.1.0"
