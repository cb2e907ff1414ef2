"""Models from files and to files: fastdiff's own exports and run folders, and diffusers
folders (UNet2DModel, AutoencoderKL or pixel-space pipelines) in and out."""
from pathlib import Path

from fastdiff.interop.autoencoder import export_autoencoder, is_autoencoder_folder, load_autoencoder
from fastdiff.interop.diffusers import export_diffusers, is_diffusers_folder, load_diffusers
from fastdiff.interop.native import MODEL_FORMAT, export_model
from fastdiff.interop.native import load_model as _load_native

__all__ = ["MODEL_FORMAT", "export_autoencoder", "export_diffusers", "export_model", "load_autoencoder",
           "load_diffusers", "load_model"]


def load_model(path, device="cpu"):
    """(model, info) from a fastdiff run folder, `fastdiff export` file or compiled package (.pt2), or a diffusers
    UNet2DModel folder, AutoencoderKL folder or pipeline folder (model_index.json): see
    load_diffusers and load_autoencoder."""
    import os
    folder = Path(os.path.expanduser(str(path)))
    if folder.suffix == ".pt2":  # `fastdiff export --compiled`: runs without compiling
        from fastdiff.interop.compiled import load_compiled
        return load_compiled(folder, device=device)
    if is_diffusers_folder(folder):
        if is_autoencoder_folder(folder):
            return load_autoencoder(path, device=device)
        return load_diffusers(path, device=device)
    return _load_native(path, device=device)
