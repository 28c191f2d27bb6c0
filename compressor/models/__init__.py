"""Model zoo. Families are registered by the explicit imports below."""
from .registry import (MODELS, ModelEntry, check_fits, create_model, dummy_input, family_ladder, get_entry,
                       input_size_for, list_families, list_models, model_identity, model_options,
                       model_stats, register_model)
from .profile import count_macs, count_params
from . import cifar_resnet, plain_cnn, torchvision_families, tv_resnet, vgg, wrn  # noqa: F401  (registration)

__all__ = [
    "MODELS", "ModelEntry", "create_model", "dummy_input", "family_ladder", "get_entry",
    "list_families", "list_models", "model_stats", "register_model", "count_macs", "count_params",
    "check_fits", "input_size_for", "model_identity", "model_options",
]
