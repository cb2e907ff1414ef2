"""File formats at the bottom of the stack: atomic writes and state-dict files.

Every file fastdiff writes for later reading (checkpoints, records, exported models,
feature networks, reports' caches) goes through `atomic_write_bytes`: readers see the old
file or the new one, never a mix, and a kill at any moment leaves no half-written file
under the final name.
"""
from __future__ import annotations

import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn

from fastdiff.errors import UserError


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




# --------------------------------------------------------------------------- run-folder lock
LOCK_NAME = ".fastdiff.lock"


class RunFolderLocked(UserError):
    """Another process is writing to the run folder."""


class RunLock:
    """An exclusive lock on a run folder: one writer at a time.

    An advisory `flock` on `<folder>/.fastdiff.lock`, held for as long as the writer lives: the
    kernel releases it when the process ends, however it ends (kill -9 included), so a stale
    lock never blocks a resume. The file holds the holder's pid and host for the message a
    second writer gets. Used as a context manager or with acquire()/release().
    """

    def __init__(self, folder, what: str = "fastdiff train"):
        self.folder, self.what, self._fd = Path(folder), what, None

    def acquire(self) -> "RunLock":
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        fd = os.open(str(path), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            _lock_fd(fd)
        except BlockingIOError:
            try:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
            finally:
                os.close(fd)
            raise RunFolderLocked(f"{self.folder} is in use by {holder}: a run folder has one writer at a time. "
                                  f"Wait for it to end, or choose another --out") from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{self.what} (pid {os.getpid()} on {socket.gethostname()})\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)  # closing the descriptor drops the lock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _lock_fd(fd: int) -> None:
    """Take an exclusive, non-blocking lock on fd; BlockingIOError when another holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            raise BlockingIOError from None
        return
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)


def remove_stale_temp_files(folder, names) -> None:
    """Delete the temp files atomic_write_bytes left for `names` (files of this folder's
    writer) when a save was killed. Call it only while holding the folder's RunLock: no other
    writer can then own them. Other temp files (another program's) are left alone."""
    folder = Path(folder)
    for name in names:
        for stale in folder.glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
            except OSError:
                pass


# --------------------------------------------------------------------------- output paths
def _first_existing(path: Path) -> Path:
    p = path
    while not p.exists() and not p.is_symlink() and p != p.parent:
        p = p.parent
    return p


def _check_parent(path: Path, flag: str) -> None:
    anchor = _first_existing(path.parent if str(path.parent) else Path("."))
    if not anchor.is_dir():
        raise UserError(f"{flag} {path}: {anchor} is not a folder (it is a file), so nothing can be written "
                        f"under it")
    if not os.access(str(anchor), os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: the folder {anchor} is not writable")


def check_output_file(path, flag: str = "--out") -> Path:
    """Check, before any work, that `path` can be written as a file: not an existing folder or
    special file, and under a folder that exists (or can be created) and is writable.
    Raises UserError naming the option."""
    path = Path(os.path.expanduser(str(path)))
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; expected a file name")
    if path.exists() and not path.is_file():
        raise UserError(f"{flag} {path}: exists and is not a regular file")
    _check_parent(path, flag)
    return path


def check_output_dir(path, flag: str = "--out") -> Path:
    """Check, before any work, that `path` is (or can be created as) a writable folder."""
    path = Path(os.path.expanduser(str(path)))
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path}: exists and is not a folder")
    if path.is_dir():
        if not os.access(str(path), os.W_OK | os.X_OK):
            raise UserError(f"{flag} {path}: the folder is not writable")
        return path
    _check_parent(path, flag)
    return path


def atomic_write_folder(out, files: Dict[str, bytes]) -> Path:
    """Write a folder of files (relative path -> bytes) so that `out` appears whole or not at
    all: everything goes to a temporary sibling folder first, which replaces `out` (absent or
    empty) in one rename; on any error the temporary folder is removed."""
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for name, data in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
