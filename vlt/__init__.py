"""vlt: vision-language models with pluggable token mixers, trained with PyTorch Lightning.

Kept light on purpose: ``import vlt`` imports nothing heavy (the CLI reads ``vlt.__version__``)."""
from importlib.metadata import PackageNotFoundError, version as _version

try:
    __version__ = _version("vlt")
except PackageNotFoundError:  # a source tree that is not installed
    __version__ = "0+unknown"
