"""The port check's families as ``freeze-parity port`` targets:
``tests.examples.applications:resnet50_keras`` against ``...:resnet50_torch``.

Built by ``tf_impl/applications.py`` and ``torch_impl/applications.py`` (see
``shared/port/families.py``) at the coverage table's size.
"""

from __future__ import annotations


def _keras(family: str):
    import torch_impl  # noqa: F401  (torch before TensorFlow)
    from tf_impl import applications

    return applications.build(family)


def _torch(family: str):
    from torch_impl import applications

    return applications.build(family)


def mobilenet_v2_keras():
    return _keras("MobileNetV2")


def mobilenet_v2_torch():
    return _torch("MobileNetV2")


def densenet121_keras():
    return _keras("DenseNet121")


def densenet121_torch():
    return _torch("DenseNet121")


def mobilenet_v3_small_keras():
    return _keras("MobileNetV3Small")


def mobilenet_v3_small_torch():
    return _torch("MobileNetV3Small")


def vgg16_keras():
    return _keras("VGG16")


def vgg16_torch():
    return _torch("VGG16")


def resnet50_keras():
    return _keras("ResNet50")


def resnet50_torch():
    return _torch("ResNet50")


def convnext_tiny_keras():
    return _keras("ConvNeXtTiny")


def convnext_tiny_torch():
    return _torch("ConvNeXtTiny")


def efficientnet_b0_keras():
    return _keras("EfficientNetB0")


def efficientnet_b0_torch():
    return _torch("EfficientNetB0")
