"""fastdiff: fast, correct diffusion models for PyTorch.

    import fastdiff
    x = fastdiff.sample(model, steps=50, eta=0)

The package is layered (docs/design.md): schedule, io, data -> diffusion -> ops -> nn,
models -> sampling -> metrics -> train -> interop -> experiments -> cli; a module never
imports one above it (tests/test_layers.py).
"""
import torch  # noqa: F401  (before the extension: one OpenMP runtime, torch's)

from fastdiff import ops  # noqa: E402
from fastdiff.diffusion import GaussianDiffusion  # noqa: E402
from fastdiff.models import UNet, compile  # noqa: E402,A004  (fastdiff.compile; not in __all__)
from fastdiff.optimization import optimize  # noqa: E402  (the module is not named optimize: the function is)
from fastdiff.sampling import sample, space_timesteps  # noqa: E402
from fastdiff.schedule import NoiseSchedule  # noqa: E402

__version__ = "0.1.0"
# `compile` stays out of __all__: `from fastdiff import *` must not shadow the builtin.
__all__ = ["GaussianDiffusion", "NoiseSchedule", "UNet", "load_model", "ops", "optimize", "sample",
           "space_timesteps", "__version__"]


def __getattr__(name):
    # fastdiff.load_model (a run folder or a `fastdiff export` file) without importing the
    # training machinery at `import fastdiff`.
    if name == "load_model":
        from fastdiff.interop import load_model
        return load_model
    raise AttributeError(f"module 'fastdiff' has no attribute {name!r}")
