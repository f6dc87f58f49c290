"""Evaluation protocols on frozen (or fine-tuned) encoders."""
from .features import extract_features
from .knn import accuracy_report, knn_classifier, knn_predict, topk_accuracy

__all__ = ["accuracy_report", "extract_features", "knn_classifier", "knn_predict", "topk_accuracy"]
