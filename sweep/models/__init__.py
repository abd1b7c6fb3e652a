"""The recurrent models of the paper, in plain PyTorch (no Ray, Optuna or MLflow here)."""

from sweep.models.params import ModelParams
from sweep.models.registry import MODELS, build_model, count_parameters, model_names, params_class

__all__ = ["MODELS", "ModelParams", "build_model", "count_parameters", "model_names", "params_class"]
