"""Backbone bodies for detection: torchvision ResNet / ResNeXt, and any timm model (TimmBody).

The body returns the C2..C5 feature maps (``OrderedDict[str, Tensor]``, finest first,
keys ``'0'..'3'`` like torchvision's ``IntermediateLayerGetter``) that a pyramid neck
consumes. Random init by default; pretrained weights only from a local file.
"""

from __future__ import annotations

import re
from collections import OrderedDict
from pathlib import Path

import torch
from torch import Tensor, nn
from torchvision.models import resnet
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d

# torchvision constructor and output channels of layer1..layer4 for each architecture (backbone.arch).
RESNET_ARCHS = {
    "resnet18": (resnet.resnet18, (64, 128, 256, 512)),
    "resnet34": (resnet.resnet34, (64, 128, 256, 512)),
    "resnet50": (resnet.resnet50, (256, 512, 1024, 2048)),
    "resnet101": (resnet.resnet101, (256, 512, 1024, 2048)),
    "resnext101": (resnet.resnext101_32x8d, (256, 512, 1024, 2048)),
    "resnext101_32x8d": (resnet.resnext101_32x8d, (256, 512, 1024, 2048)),
}
NORMS = ("bn", "frozen_bn")


def _check_body_args(return_layers: list[int], frozen_stages: int, norm: str) -> list[int]:
    """The arguments every body shares, checked; returns ``return_layers`` as a list."""
    if norm not in NORMS:
        raise ValueError(f"backbone.norm={norm!r} is not known; choose one of {list(NORMS)}")
    if not 0 <= frozen_stages <= 4:
        raise ValueError(f"backbone.frozen_stages={frozen_stages} must be in 0..4")
    return_layers = list(return_layers)
    if not return_layers or any(i not in (1, 2, 3, 4) for i in return_layers) or sorted(
        return_layers
    ) != return_layers:
        raise ValueError(f"backbone.return_layers={return_layers} must be increasing indices in 1..4")
    return return_layers


class _FrozenStages(nn.Module):
    """``train()`` that keeps frozen stages (``_frozen_modules``) and, with ``norm_eval``, every BN in eval.

    A body calls ``self.train()`` at the end of its constructor: Lightning (>= 2.2) never calls
    ``train()`` on the model at the start of fit, it keeps each module's own ``training`` flag (and
    restores those flags after validation). Without it, a freshly built body under the Trainer ran
    its frozen and ``norm_eval`` BatchNorms in training mode (batch statistics, running statistics
    updated), unlike a plain loop that calls ``net.train()``.
    """

    _frozen_modules: list[nn.Module]
    norm_eval: bool

    def train(self, mode: bool = True) -> _FrozenStages:
        super().train(mode)
        if mode:
            # Frozen stages stay in eval mode (their BN statistics are frozen too), and
            # with norm_eval every BN uses its running statistics.
            for m in self._frozen_modules:
                m.eval()
            if self.norm_eval:
                for m in self.modules():
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()
        return self


class ResNetBody(_FrozenStages):
    """ResNet / ResNeXt body returning C2..C5 (or a subset) as an ordered dict.

    Args:
        arch: one of ``resnet18, resnet34, resnet50, resnet101, resnext101``.
        return_layers: which of layer1..layer4 to return, as indices 1..4
            (``[2, 3, 4]`` = C3..C5 for RetinaNet/FCOS; ``[1, 2, 3, 4]`` for R-CNNs).
        frozen_stages: 0 = nothing frozen; 1 = stem + layer1 (MMDetection's
            ``frozen_stages=1``, the papers' setting); k = stem + layer1..layerk.
        norm: ``bn`` (trainable BatchNorm; SyncBN is applied by the trainer) or
            ``frozen_bn`` (torchvision's FrozenBatchNorm2d: no parameters, fixed stats).
        norm_eval: keep BatchNorm layers in eval mode while training (MMDetection's
            ``norm_eval=True``: use running statistics, still learn the affine part).
            Right for fine-tuning pretrained weights with small batches; wrong when
            training from scratch, where BN must learn its statistics.
        weights_path: optional local ``.pth`` state dict (torchvision layout). Never
            downloaded: this framework runs without network access.

    Example:
        >>> body = ResNetBody("resnet18", return_layers=[2, 3, 4])
        >>> [tuple(v.shape) for v in body(torch.rand(1, 3, 64, 96)).values()]
        [(1, 128, 8, 12), (1, 256, 4, 6), (1, 512, 2, 3)]
    """

    def __init__(
        self,
        arch: str = "resnet50",
        return_layers: list[int] | tuple[int, ...] = (2, 3, 4),
        frozen_stages: int = 1,
        norm: str = "bn",
        norm_eval: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        if arch not in RESNET_ARCHS:
            raise ValueError(f"backbone.arch={arch!r} is not known; choose one of {sorted(RESNET_ARCHS)}")
        return_layers = _check_body_args(return_layers, frozen_stages, norm)
        builder, channels = RESNET_ARCHS[arch]
        norm_layer = FrozenBatchNorm2d if norm == "frozen_bn" else nn.BatchNorm2d
        net = builder(weights=None, norm_layer=norm_layer)
        if weights_path:
            load_local_weights(net, weights_path)
        # Freeze explicitly: torchvision only freezes when it loads weights itself.
        stages = [nn.ModuleList([net.conv1, net.bn1])] + [getattr(net, f"layer{i}") for i in range(1, 5)]
        for stage in stages[: frozen_stages + 1] if frozen_stages > 0 else []:
            for p in stage.parameters():
                p.requires_grad_(False)
        self._frozen_modules = stages[: frozen_stages + 1] if frozen_stages > 0 else []
        self.body = IntermediateLayerGetter(net, {f"layer{i}": str(k) for k, i in enumerate(return_layers)})
        self.out_channels_list = [channels[i - 1] for i in return_layers]
        self.strides = [2 ** (i + 1) for i in return_layers]
        self.norm_eval = norm_eval
        self.arch = arch
        self.train()  # frozen stages and norm_eval BNs in eval mode from the start: see _FrozenStages

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        """``x``: (B, 3, H, W) normalised images -> C-levels, finest first."""
        return self.body(x)



class TimmBody(_FrozenStages):
    """Any timm model with ``features_only`` as a body returning C2..C5 (or a subset) by stride.

    Args:
        model_name: a ``timm.list_models()`` name (``resnest101e``, ``ese_vovnet99b``, ...).
        return_layers: which of C2..C5 to return, as indices 1..4 (level i has stride 2^(i+1)),
            picked from timm's ``feature_info`` by reduction, keys '0'.. finest first.
        frozen_stages: 0 = nothing frozen; k = everything up to and including the stage of
            stride 2^(k+1) (1 = stem + the stride-4 stage, as ResNetBody's).
        norm: ``bn`` or ``frozen_bn`` (timm's ``freeze_batch_norm_2d``: fixed statistics, no
            parameters). norm_eval: BatchNorm layers stay in eval mode while training.
        weights_path: optional local state dict of the full timm model (``timm.create_model(NAME)``
            layout; the classifier is ignored). timm is always called with ``pretrained=False``:
            nothing is downloaded.

    ``forward``: (B, 3, H, W) -> OrderedDict of the chosen levels (B, C_i, H/2^(i+1), W/2^(i+1)).
    """

    def __init__(
        self,
        model_name: str,
        return_layers: list[int] | tuple[int, ...] = (2, 3, 4),
        frozen_stages: int = 1,
        norm: str = "bn",
        norm_eval: bool = False,
        weights_path: str | None = None,
    ) -> None:
        super().__init__()
        import timm
        from timm.layers import freeze_batch_norm_2d

        return_layers = _check_body_args(return_layers, frozen_stages, norm)
        if not timm.is_model(model_name):
            close = timm.list_models(f"*{model_name.split('_')[0]}*")[:8]
            raise ValueError(f"backbone.model_name={model_name!r} is not a timm model; similar: {close}")
        try:
            net = timm.create_model(model_name, pretrained=False, features_only=True)
        except (RuntimeError, AttributeError, TypeError) as e:  # models without a feature extractor
            raise ValueError(f"backbone.model_name={model_name!r} has no timm features_only body: {e}") from e
        reductions = net.feature_info.reduction()
        # the deepest output of each stride (a model may list several at one stride)
        by_stride = {r: i for i, r in enumerate(reductions)}
        missing = [2 ** (i + 1) for i in range(1, 5) if 2 ** (i + 1) not in by_stride]
        if missing:
            raise ValueError(
                f"backbone.model_name={model_name!r} has feature strides {reductions}; C2..C5 need 4, 8, 16, 32"
            )
        self.out_indices = [by_stride[2 ** (i + 1)] for i in return_layers]
        if weights_path:
            load_timm_weights(net, weights_path)
        if norm == "frozen_bn":
            net = freeze_batch_norm_2d(net)
        children = [name for name, _ in net.named_children()]
        frozen: list[nn.Module] = []
        if frozen_stages > 0:
            # FeatureListNet flattens nested stages: feature 'stages.0' is child 'stages_0'
            last = net.feature_info.module_name()[by_stride[2 ** (frozen_stages + 1)]].replace(".", "_")
            if last not in children:
                raise ValueError(f"backbone.frozen_stages: cannot find timm module {last!r} in {model_name}")
            frozen = [getattr(net, name) for name in children[: children.index(last) + 1]]
        for m in frozen:
            for p in m.parameters():
                p.requires_grad_(False)
        self._frozen_modules = frozen
        self.body = net
        channels = net.feature_info.channels()
        self.out_channels_list = [channels[i] for i in self.out_indices]
        self.strides = [2 ** (i + 1) for i in return_layers]
        self.norm_eval = norm_eval
        self.arch = model_name
        self.train()  # frozen stages and norm_eval BNs in eval mode from the start: see _FrozenStages

    def forward(self, x: Tensor) -> OrderedDict[str, Tensor]:
        feats = self.body(x)
        return OrderedDict((str(k), feats[i]) for k, i in enumerate(self.out_indices))


def load_timm_weights(net: nn.Module, path: str | Path) -> None:
    """Load a full timm model's state dict (local file) into its ``features_only`` body.

    The body is truncated after its last feature level, so keys beyond it (the classifier)
    are ignored; every key of the body must be in the file with its shape. FeatureListNet
    renames nested stages ('stages.0.x' -> 'stages_0.x'): both spellings are accepted.
    """
    path, state = _read_state_dict(path)

    def source_key(k: str) -> str:
        first, _, rest = k.partition(".")
        m = re.fullmatch(r"(.+)_(\d+)", first)
        return k if k in state or not m else f"{m[1]}.{m[2]}.{rest}"

    own = {k: v for k, v in net.state_dict().items() if not k.endswith("num_batches_tracked")}
    mapped = {k: state[source_key(k)] for k in own if source_key(k) in state}
    _load_checked(net, own, mapped, path)


def _read_state_dict(path: str | Path) -> tuple[Path, dict]:
    if str(path) == "embedded":
        raise FileNotFoundError("backbone.weights_path=embedded was not resolved to a file: the training commands "
                                "replace it by the cached pretrained body (lightning_modules/pretrain.py)")
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"backbone.weights_path: no such file: {path} (expected a local .pth state dict)")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return path, state


def load_local_weights(net: nn.Module, path: str | Path) -> None:
    """Load a torchvision-layout ResNet state dict from a local file (no download).

    The classifier (``fc.*``) may be missing or have another size; every other key
    must match, otherwise the error lists the mismatching keys.
    """
    path, state = _read_state_dict(path)
    # fc.* is the ImageNet classifier; num_batches_tracked is absent in frozen BN.
    def keep(k: str) -> bool:
        return not k.startswith("fc.") and not k.endswith("num_batches_tracked")

    state = {k: v for k, v in state.items() if keep(k)}
    own = {k: v for k, v in net.state_dict().items() if keep(k)}
    _load_checked(net, own, state, path)


def _load_checked(net: nn.Module, own: dict, state: dict, path: Path) -> None:
    """``net.load_state_dict(state)`` after checking ``state`` covers exactly ``own``'s keys and shapes."""
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shape = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or shape:
        raise ValueError(
            f"backbone weights {path} do not fit this architecture: "
            f"missing={missing[:5]} unexpected={unexpected[:5]} wrong_shape={shape[:5]}"
        )
    net.load_state_dict(state, strict=False)
