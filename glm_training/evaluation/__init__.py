"""Evaluation: metrics of generated images (and BAGEL's text answers) against targets."""

from glm_training.evaluation.metrics import METRIC_NAMES, EvalMetrics, build_metrics

__all__ = ["METRIC_NAMES", "EvalMetrics", "build_metrics"]
