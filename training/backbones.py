"""Backbones and the embedding head: features → cubic GeM pooling → linear → L2 normalisation.

``bn_inception`` is Inception with batch normalisation (Ioffe & Szegedy 2015), the paper's backbone,
with the parameter names of the ``bn_inception-52deb4733.pth`` ImageNet checkpoint used across DML
repositories (Cadene's pretrainedmodels layout: ``conv1_7x7_s2``, ``inception_3a_1x1_bn``, ...), so
that file loads as is. Its weights were converted from Caffe: inputs are BGR in 0-255 minus the
channel means (training.transforms handles that for this backbone).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


class GeM(nn.Module):
    """Generalised-mean pooling, (mean x^p)^(1/p) over the spatial positions; p = 3 is cubic GeM."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p, self.eps = p, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=self.eps).pow(self.p).mean(dim=(-2, -1)).pow(1.0 / self.p)


# One row per inception block: name, input channels, 1x1 branch (0 = none), (3x3 reduce, 3x3),
# (double-3x3 reduce, first, second), pool ("avg"/"max"), pool projection (0 = none), stride.
_BLOCKS = (
    ("3a", 192, 64, (64, 64), (64, 96, 96), "avg", 32, 1),
    ("3b", 256, 64, (64, 96), (64, 96, 96), "avg", 64, 1),
    ("3c", 320, 0, (128, 160), (64, 96, 96), "max", 0, 2),
    ("4a", 576, 224, (64, 96), (96, 128, 128), "avg", 128, 1),
    ("4b", 576, 192, (96, 128), (96, 128, 128), "avg", 128, 1),
    ("4c", 576, 160, (128, 160), (128, 160, 160), "avg", 128, 1),
    ("4d", 608, 96, (128, 192), (160, 192, 192), "avg", 128, 1),
    ("4e", 608, 0, (128, 192), (192, 256, 256), "max", 0, 2),
    ("5a", 1056, 352, (192, 320), (160, 224, 224), "avg", 128, 1),
    ("5b", 1024, 352, (192, 320), (192, 224, 224), "max", 128, 1),
)


class BNInception(nn.Module):
    """Inception-v2 (BN-Inception) feature extractor: (N, 3, H, W) → (N, 1024, H/32, W/32).

    Layers are registered directly on the module under the checkpoint's names; ``_paths`` records
    which of them form each branch of each block.
    """

    out_features = 1024

    def __init__(self):
        super().__init__()
        self._conv("conv1_7x7_s2", 3, 64, 7, 2)
        self._conv("conv2_3x3_reduce", 64, 64, 1)
        self._conv("conv2_3x3", 64, 192, 3)
        self._blocks = []
        for name, cin, c1, (r3, c3), (rd, d1, d2), pool, proj, stride in _BLOCKS:
            p = f"inception_{name}_"
            branches = []
            if c1:
                branches.append([self._conv(p + "1x1", cin, c1, 1)])
            branches.append([self._conv(p + "3x3_reduce", cin, r3, 1),
                             self._conv(p + "3x3", r3, c3, 3, stride)])
            branches.append([self._conv(p + "double_3x3_reduce", cin, rd, 1),
                             self._conv(p + "double_3x3_1", rd, d1, 3),
                             self._conv(p + "double_3x3_2", d1, d2, 3, stride)])
            pool_branch = [(pool, stride)]
            if proj:
                pool_branch.append(self._conv(p + "pool_proj", cin, proj, 1))
            branches.append(pool_branch)
            self._blocks.append(branches)

    def _conv(self, name: str, cin: int, cout: int, k: int, stride: int = 1) -> str:
        self.add_module(name, nn.Conv2d(cin, cout, k, stride, padding=k // 2))
        self.add_module(name + "_bn", nn.BatchNorm2d(cout))
        return name

    def _layer(self, name: str, x: torch.Tensor) -> torch.Tensor:
        return F.relu(getattr(self, name + "_bn")(getattr(self, name)(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._layer("conv1_7x7_s2", x)
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        x = self._layer("conv2_3x3", self._layer("conv2_3x3_reduce", x))
        x = F.max_pool2d(x, 3, 2, ceil_mode=True)
        for branches in self._blocks:
            outs = []
            for branch in branches:
                y = x
                for step in branch:
                    if isinstance(step, tuple):
                        kind, stride = step
                        if kind == "avg":
                            y = F.avg_pool2d(y, 3, 1, 1, ceil_mode=True, count_include_pad=True)
                        else:
                            y = F.max_pool2d(y, 3, stride, padding=1 if stride == 1 else 0,
                                             ceil_mode=True)
                    else:
                        y = self._layer(step, y)
                outs.append(y)
            x = torch.cat(outs, 1)
        return x


def load_weights(model: nn.Module, path: str | Path, layout: str, classifier: str) -> None:
    """Load an ImageNet checkpoint whose keys match ``model`` exactly, except for the classifier
    (keys starting with ``classifier``, dropped on both sides: the embedding layer replaces it) and
    ``num_batches_tracked`` counters, which older checkpoints lack. Any other mismatch is an error
    that lists the keys, rather than a silently half-loaded network."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    state = {k: v for k, v in state.items() if not k.startswith(classifier)}
    own = {k for k in model.state_dict() if not k.startswith(classifier)}
    missing = sorted(k for k in own - state.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(state.keys() - own)
    if missing or unexpected:
        raise ValueError(f"{path} is not a {layout} checkpoint: missing {missing[:5]}"
                         f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}"
                         f"{'...' if len(unexpected) > 5 else ''}")
    model.load_state_dict(state, strict=False)


def _resnet50(pretrained: str) -> tuple[nn.Module, int]:
    try:
        import torchvision

        net = torchvision.models.resnet50(weights=None)
    except ImportError:
        try:
            import timm
        except ImportError:
            raise ImportError("the resnet50 backbone needs torchvision or timm; install one "
                              "(with the torch you have) or use backbone=bn_inception") from None
        net = timm.create_model("resnet50", pretrained=False)
    if pretrained:
        load_weights(net, pretrained, "ResNet-50", classifier="fc.")
    # Everything up to the last residual stage: drop global pooling and the classifier.
    trunk = nn.Sequential(*[m for name, m in net.named_children()
                            if name not in ("avgpool", "global_pool", "fc")])
    return trunk, 2048


def _small_cnn(width: int) -> tuple[nn.Module, int]:
    """Three conv/BN/ReLU stages for small images (the digits of the embedded default)."""
    layers, cin = [], 3
    for cout, stride in ((width // 4, 1), (width // 2, 2), (width, 2)):
        layers += [nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        cin = cout
    return nn.Sequential(*layers), width


class MLP(nn.Module):
    """Two hidden layers, no normalisation layers (so DDP results do not depend on the split)."""

    def __init__(self, dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, width), nn.ReLU(), nn.Linear(width, width),
                                 nn.ReLU())
        self.out_features = width

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class EmbeddingNet(nn.Module):
    """backbone → (GeM for feature maps) → linear → L2-normalised embedding."""

    def __init__(self, trunk: nn.Module, features: int, embedding_size: int, gem_p: float):
        super().__init__()
        self.trunk = trunk
        self.pool = GeM(gem_p)
        self.embed = nn.Linear(features, embedding_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.trunk(x)
        if h.dim() == 4:
            h = self.pool(h)
        return F.normalize(self.embed(h), dim=1)


IMAGENET_BACKBONES = ("bn_inception", "resnet50")


def random_init_note(name: str) -> str:
    return (f"{name}: no pretrained weights given, training from random initialisation (the paper "
            "fine-tunes ImageNet weights; set pretrained=PATH)")


def build(cfg: dict, input_dim: int | None = None) -> EmbeddingNet:
    """The network of ``cfg``; ``input_dim`` is the vector size for the mlp backbone."""
    name, weights = cfg["backbone"], cfg["pretrained"]
    if weights and not Path(weights).is_file():
        raise FileNotFoundError(f"pretrained weights {weights!r} not found")
    if name == "bn_inception":
        trunk, features = BNInception(), BNInception.out_features
        if weights:
            load_weights(trunk, weights, "BN-Inception (pretrainedmodels layout)",
                         classifier="last_linear.")
    elif name == "resnet50":
        trunk, features = _resnet50(weights)
    elif name == "small_cnn":
        trunk, features = _small_cnn(cfg["hidden_size"])
    else:
        if input_dim is None:
            raise ValueError("the mlp backbone needs vector inputs (dataset=synthetic)")
        trunk = MLP(input_dim, cfg["hidden_size"])
        features = trunk.out_features
    if weights and name not in IMAGENET_BACKBONES:
        raise ValueError(f"backbone {name!r} has no pretrained weights; set pretrained=''")
    if not weights and name in IMAGENET_BACKBONES:
        warnings.warn(random_init_note(name), stacklevel=2)
    return EmbeddingNet(trunk, features, cfg["embedding_size"], cfg["gem_p"])
