"""The ConvNeXt family (Liu et al., 2022) and the ResNet-50 baseline behind one factory."""
from .batchnorm_calibration import calibrate_batch_norms
from .checkpoints import CheckpointError, load_checkpoint, read_checkpoint, trained_activation
from .factory import create_model
from .layer_scale import draw_layer_scales
from .registry import MODEL_CONFIGS, DataConfig, ModelConfig, get_config, list_models

__all__ = [
    "create_model", "load_checkpoint", "read_checkpoint", "trained_activation", "CheckpointError",
    "list_models", "get_config", "MODEL_CONFIGS", "ModelConfig", "DataConfig", "calibrate_batch_norms",
    "draw_layer_scales",
]
