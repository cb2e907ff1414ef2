"""File formats at the bottom of the stack: atomic writes and state-dict files.

Every file fastdiff writes for later reading (checkpoints, records, exported models,
feature networks, reports' caches) goes through `atomic_write_bytes`: readers see the old
file or the new one, never a mix, and a kill at any moment leaves no half-written file
under the final name.
"""
from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # e.g. Windows: directories cannot be opened
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _save_hook(path: Path, tag: str) -> None:
    """Test hook: FASTDIFF_TEST_SAVE_HOOK=sleep:SECONDS|raise, fired between writing the
    temp file and the rename, when "<file name>@<tag>" ends with FASTDIFF_TEST_SAVE_HOOK_MATCH
    (the tag of a checkpoint file is its step)."""
    hook = os.environ.get("FASTDIFF_TEST_SAVE_HOOK")
    if not hook or not f"{path.name}@{tag}".endswith(os.environ.get("FASTDIFF_TEST_SAVE_HOOK_MATCH", "")):
        return
    if hook.startswith("sleep"):
        print(f"[save hook] sleeping before renaming {path.name}", file=sys.stderr, flush=True)
        time.sleep(float(hook.partition(":")[2] or 3600))
    elif hook == "raise":
        raise RuntimeError(f"save hook: simulated failure while saving {path.name}")


def atomic_write_bytes(path, data: bytes, tag: str = "") -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a mix."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=str(path.parent), prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; checkpoints are ordinary files
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _save_hook(path, tag)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)



# --------------------------------------------------------------------------- state dicts
def _read_state_dict(path: Path) -> Dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        return load_file(str(path))
    obj = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path}: expected a state dict (parameter name -> tensor), got {type(obj).__name__}")
    return obj


def load_state_dict_strict(module: nn.Module, path, what: str) -> None:
    """Load a state-dict file into `module` with strict=True; errors name the file and the keys."""
    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{path}: {what} weights file not found")
    try:
        state = _read_state_dict(path)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: cannot read {what} weights ({type(e).__name__}: {e})") from None
    expected = set(module.state_dict())
    got = set(state)
    # BatchNorm fills a missing num_batches_tracked itself (files from older torch lack it)
    missing = sorted(k for k in expected - got if not k.endswith("num_batches_tracked"))
    unexpected = sorted(got - expected)
    if missing or unexpected:
        def show(keys):
            return ", ".join(keys[:5]) + (f" ... ({len(keys)} in all)" if len(keys) > 5 else "")
        raise ValueError(f"{path}: not {what} weights: {len(missing)} missing keys [{show(missing)}], "
                         f"{len(unexpected)} unexpected keys [{show(unexpected)}]")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path}: {what} weights do not fit the network: {e}") from None


