"""Head discovery: adapters that split a classifier into features and its pooling head."""
from .base import (Adapter, HeadInfo, HeadSplit, default_input_size, discover, list_adapters,
                   register_adapter)
from . import fx, hf, timm, torchvision, trained  # noqa: F401,E402  (the built-in adapters register on import)
from . import timm_multi  # noqa: F401,E402  (CrossViT, CoaT, EfficientViM: multi-branch features)

__all__ = ["Adapter", "HeadInfo", "HeadSplit", "discover", "list_adapters", "register_adapter",
           "default_input_size"]
