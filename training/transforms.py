"""Image transforms of the paper's protocol, with torch and PIL alone.

torchvision is used when it is importable; otherwise the small classes below do the same job with
the same semantics (``Resize(int)`` resizes the shorter side, RandomResizedCrop samples area and log
aspect ratio uniformly with ten tries and a centre-crop fallback). Random draws come from torch's
global generator, which the DataLoader seeds per worker and the checkpoint saves, so resumed runs
see the same augmentations.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image

try:  # pragma: no cover - depends on the environment
    import torchvision.transforms as _tv
except ImportError:  # torchvision is optional
    _tv = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomResizedCrop:
    def __init__(self, size: int, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
        self.size, self.scale, self.ratio = size, scale, ratio

    def box(self, width: int, height: int) -> tuple[int, int, int, int]:
        area = width * height
        log_ratio = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * torch.empty(1).uniform_(*self.scale).item()
            aspect = math.exp(torch.empty(1).uniform_(*log_ratio).item())
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,)).item())
                left = int(torch.randint(0, width - w + 1, (1,)).item())
                return left, top, w, h
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, int(round(width / self.ratio[0]))
        elif aspect > self.ratio[1]:
            w, h = int(round(height * self.ratio[1])), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image) -> Image.Image:
        left, top, w, h = self.box(*img.size)
        return img.resize((self.size, self.size), Image.BILINEAR,
                          box=(left, top, left + w, top + h))


class RandomHorizontalFlip:
    def __call__(self, img: Image.Image) -> Image.Image:
        if torch.rand(1).item() < 0.5:
            return img.transpose(Image.FLIP_LEFT_RIGHT)
        return img


class Resize:
    """Shorter side to ``size``, aspect ratio kept."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        if w <= h:
            new = (self.size, int(self.size * h / w))
        else:
            new = (int(self.size * w / h), self.size)
        return img.resize(new, Image.BILINEAR)


class CenterCrop:
    def __init__(self, size: int):
        self.size = size

    def __call__(self, img: Image.Image) -> Image.Image:
        w, h = img.size
        left = int(round((w - self.size) / 2.0))
        top = int(round((h - self.size) / 2.0))
        return img.crop((left, top, left + self.size, top + self.size))


class ToNormalizedTensor:
    """HWC uint8 RGB to CHW float. ``caffe=True`` is BN-Inception's convention (its ImageNet
    weights were converted from Caffe): BGR order, 0-255 range, channel means subtracted, std 1."""

    def __init__(self, caffe: bool = False):
        self.caffe = caffe

    def __call__(self, img: Image.Image) -> torch.Tensor:
        x = torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32).copy())
        x = x.permute(2, 0, 1)
        if self.caffe:
            return x[[2, 1, 0]] - torch.tensor([104.0, 117.0, 128.0]).view(3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        return (x / 255.0 - mean) / std


class Compose:
    def __init__(self, steps):
        self.steps = list(steps)

    def __call__(self, img):
        for step in self.steps:
            img = step(img)
        return img


def build(train: bool, image_size: int, resize_size: int, crop_scale_min: float, hflip: bool,
          caffe: bool) -> Compose:
    """Training: RandomResizedCrop(image_size) [+ flip]; test: Resize(resize_size) + CenterCrop."""
    lib = _tv
    if train:
        crop_cls = lib.RandomResizedCrop if lib else RandomResizedCrop
        steps = [crop_cls(image_size, scale=(crop_scale_min, 1.0))]
        if hflip:
            steps.append(lib.RandomHorizontalFlip() if lib else RandomHorizontalFlip())
    else:
        steps = [(lib.Resize if lib else Resize)(resize_size),
                 (lib.CenterCrop if lib else CenterCrop)(image_size)]
    return Compose(steps + [ToNormalizedTensor(caffe)])
