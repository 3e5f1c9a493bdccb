"""Keeping and using a winner: kept models (`recognizer`: Orbax variables and a model card),
their exports (`export`: jax, SavedModel, TFLite) and labels for new images (`predict`).
Importing `predict` needs neither TensorFlow Datasets nor matplotlib.
"""

__all__ = ["export", "predict", "recognizer"]
