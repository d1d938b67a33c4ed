"""Verification metrics (metrics), evaluation of a model on a data folder (verification) and the
teacher-vs-students report (report)."""
from pipeline.evaluation.verification import evaluate_folder, write_metrics

__all__ = ["evaluate_folder", "write_metrics"]
