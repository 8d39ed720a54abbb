"""GQSA: group quantization and sparsity for LLMs."""
from gqsa._version import __version__

