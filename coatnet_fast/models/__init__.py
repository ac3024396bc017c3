from .coatnet import FFN, SE, Attention, CoAtNet, MBConv, Transformer, conv_3x3_bn
from .layers import ConvBN, DWConvBNGELU, FusedOpModule, MaxPool2d, drop_path, drop_path_scale, get_backend, set_backend
from .registry import MODEL_CONFIGS, coatnet_0, coatnet_1, coatnet_2, coatnet_3, coatnet_4, create_model, list_models

__all__ = [
    "Attention", "CoAtNet", "ConvBN", "DWConvBNGELU", "FFN", "FusedOpModule", "MaxPool2d", "MBConv", "MODEL_CONFIGS", "SE",
    "Transformer", "coatnet_0", "coatnet_1", "coatnet_2", "coatnet_3", "coatnet_4", "conv_3x3_bn",
    "create_model", "drop_path", "drop_path_scale", "get_backend", "list_models", "set_backend",
]
