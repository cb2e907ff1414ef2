"""Models from files and to files: fastdiff's own exports and run folders."""
from fastdiff.interop.native import MODEL_FORMAT, export_model, load_model

__all__ = ["MODEL_FORMAT", "export_model", "load_model"]
