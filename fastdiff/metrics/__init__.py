"""Sample-quality metrics (`fid`: Fréchet distance, feature statistics, KID, precision/recall)
and the feature extractors they use (`features`: the FID Inception-v3, the shapes CNN)."""
from fastdiff.metrics.features import (FeatureExtractor, FIDInceptionV3, InceptionV3Features, ShapesCNN,
                                       ShapesFeatures, compute_stats, load_shapes_features)
from fastdiff.metrics.fid import FeatureStats, fid_from_features, frechet_distance, kid, precision_recall

__all__ = ["FIDInceptionV3", "FeatureExtractor", "FeatureStats", "InceptionV3Features", "ShapesCNN",
           "ShapesFeatures", "compute_stats", "fid_from_features", "frechet_distance", "kid",
           "load_shapes_features", "precision_recall"]
