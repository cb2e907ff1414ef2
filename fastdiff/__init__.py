"""fastdiff: fast, correct diffusion models for PyTorch."""
import torch  # noqa: F401  (before the extension: one OpenMP runtime, torch's)

from fastdiff import ops  # noqa: E402

__version__ = "0.1.0"
__all__ = ["ops", "__version__"]
