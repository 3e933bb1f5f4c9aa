"""Model zoo (PyTorch, prunable conv/linear layers) and dataset loaders."""

from models.datasets import DATASETS, Dataset, load_dataset
from models.zoo import MODELS, build_model, model_names

__all__ = ["DATASETS", "Dataset", "load_dataset", "MODELS", "build_model", "model_names"]
