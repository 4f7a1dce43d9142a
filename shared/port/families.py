"""The architecture families keras.applications and torchvision both ship, as the port check
is proven on them (tests/test_port_families.py, the coverage table in README and
docs/PORTING.md, ``freeze-parity bench --port``).

Each family is a Keras model, ``keras.applications.<Family>(weights=None,
include_top=False, pooling="avg")``, against torchvision's model of the same name
with its classifier replaced by the identity (``tf_impl/applications.py``,
``torch_impl/applications.py`` build them), checked at SIZE x SIZE with the torch
weights transferred and STEPS training steps.
"""

from __future__ import annotations

__all__ = ["FAMILIES", "SIZE", "STEPS"]

# family -> (keras.applications name, torchvision.models builder)
FAMILIES = {
    "MobileNetV2": ("MobileNetV2", "mobilenet_v2"),
    "DenseNet121": ("DenseNet121", "densenet121"),
    "MobileNetV3Small": ("MobileNetV3Small", "mobilenet_v3_small"),
    "VGG16": ("VGG16", "vgg16"),
    "ResNet50": ("ResNet50", "resnet50"),
    "ConvNeXtTiny": ("ConvNeXtTiny", "convnext_tiny"),
    "EfficientNetB0": ("EfficientNetB0", "efficientnet_b0"),
}
# The coverage table's input (H = W, 3 channels) and steps. 64 x 64 keeps at least 2 x 2
# maps in every family's last stage: a training-mode BatchNorm there normalises over
# batch 4 x 4 = 16 values per channel (PORT_BN_MIN_VALUES).
SIZE = 64
STEPS = 1
