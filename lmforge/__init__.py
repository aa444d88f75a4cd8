"""lmforge: the InternLM2 recipe as an operable workflow."""

__version__ = "0.1.0"
