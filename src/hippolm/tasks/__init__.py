"""Synthetic tasks for comparing mixers."""

from .mqar import MQARSettings, evaluate, mqar_data, train_mqar

__all__ = ["MQARSettings", "evaluate", "mqar_data", "train_mqar"]
