"""Layer 1, models: the model zoo (PyTorch, prunable conv/linear layers) and batch-norm folding."""

from toolchain.models.zoo import MODELS, build_model, model_names

__all__ = ["MODELS", "build_model", "model_names"]
