"""Evaluation protocols on frozen (or fine-tuned) encoders."""
from .features import extract_features
from .knn import knn_classifier, knn_predict, topk_accuracy

__all__ = ["extract_features", "knn_classifier", "knn_predict", "topk_accuracy"]
