"""Datasets: the paper's three from their official on-disk layouts, and the embedded default's two.

Every dataset is split by class, as in DML: the network never sees a test class during training.
Labels are renumbered 0..C-1 within each split. Nothing is downloaded; see training/README.md for
where the datasets come from.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from . import transforms

# The synthetic set is the same for every seed: seeds vary the training, not the data.
SYNTHETIC_DATA_SEED = 1234


class DatasetError(ValueError):
    """A dataset that is missing, malformed or has an unreadable image."""


class ImageDataset(Dataset):
    """Images given as file paths (opened lazily) or as PIL images, with integer labels."""

    def __init__(self, items: list, labels: list[int], transform):
        self.items, self.transform = items, transform
        self.labels = torch.as_tensor(_renumber(labels))

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        if isinstance(item, Path):
            try:
                with Image.open(item) as img:
                    img = img.convert("RGB")
            except (OSError, UnidentifiedImageError) as err:
                raise DatasetError(f"cannot read image {item}: {err}") from None
        else:
            img = item
        return self.transform(img), self.labels[index]


class VectorDataset(Dataset):
    def __init__(self, vectors: torch.Tensor, labels: list[int]):
        self.vectors = vectors
        self.labels = torch.as_tensor(_renumber(labels))

    def __len__(self) -> int:
        return len(self.vectors)

    def __getitem__(self, index: int):
        return self.vectors[index], self.labels[index]


@dataclass
class Splits:
    train: Dataset
    test: Dataset

    @property
    def num_train_classes(self) -> int:
        return int(self.train.labels.max()) + 1


def _renumber(labels) -> np.ndarray:
    _, inverse = np.unique(np.asarray(labels), return_inverse=True)
    return inverse.astype(np.int64)


def _locate(root: Path, folder: str, required: tuple[str, ...], what: str, source: str) -> Path:
    """``root/folder`` or ``root`` itself, whichever holds the required files."""
    for base in (root / folder, root):
        if all((base / name).exists() for name in required):
            return base
    expected = ", ".join(str(root / folder / name) for name in required)
    raise DatasetError(f"{what} not found under --data-root {root}: expected {expected} "
                       f"(the official layout; {source})")


def _read_rows(path: Path, fields: int, header: bool = False) -> list[list[str]]:
    rows = []
    with open(path) as fh:
        lines = fh.read().splitlines()
    for number, line in enumerate(lines[1:] if header else lines, start=2 if header else 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != fields:
            raise DatasetError(f"{path}, line {number}: expected {fields} fields, got {line!r}")
        rows.append(parts)
    if not rows:
        raise DatasetError(f"{path} holds no entries")
    return rows


def _int(text: str, path: Path) -> int:
    try:
        return int(text)
    except ValueError:
        raise DatasetError(f"{path}: expected an integer, got {text!r}") from None


def _split_by_class(paths, classes, is_train, build) -> Splits:
    train = [i for i, c in enumerate(classes) if is_train(c)]
    test = [i for i, c in enumerate(classes) if not is_train(c)]
    if not train or not test:
        raise DatasetError("the dataset has no training or no test classes after the class split")
    return Splits(build([paths[i] for i in train], [classes[i] for i in train], True),
                  build([paths[i] for i in test], [classes[i] for i in test], False))


def load_cub(root: Path, build) -> Splits:
    """CUB-200-2011: classes 1-100 train, 101-200 test."""
    base = _locate(root, "CUB_200_2011", ("images.txt", "image_class_labels.txt", "images"),
                   "CUB-200-2011", "CUB_200_2011.tgz from https://www.vision.caltech.edu/datasets/"
                   "cub_200_2011/")
    images = {_int(i, base / "images.txt"): p for i, p in _read_rows(base / "images.txt", 2)}
    label_file = base / "image_class_labels.txt"
    labels = {_int(i, label_file): _int(c, label_file) for i, c in _read_rows(label_file, 2)}
    if images.keys() != labels.keys():
        raise DatasetError(f"{base / 'images.txt'} and {label_file} list different image ids")
    ids = sorted(images)
    return _split_by_class([base / "images" / images[i] for i in ids], [labels[i] for i in ids],
                           lambda c: c <= 100, build)


def load_cars(root: Path, build) -> Splits:
    """Cars196 (cars_annos.mat + car_ims/): classes 1-98 train, 99-196 test."""
    import scipy.io

    base = _locate(root, "cars196", ("cars_annos.mat", "car_ims"), "Cars196",
                   "car_ims.tgz and cars_annos.mat of the Stanford Cars dataset, "
                   "https://ai.stanford.edu/~jkrause/cars/car_dataset.html")
    mat_path = base / "cars_annos.mat"
    try:
        mat = scipy.io.loadmat(mat_path, squeeze_me=True)
        ann = np.atleast_1d(mat["annotations"])
        paths = [base / str(p) for p in np.atleast_1d(ann["relative_im_path"])]
        classes = [int(c) for c in np.atleast_1d(ann["class"])]
    except (ValueError, KeyError, OSError, TypeError, IndexError) as err:
        raise DatasetError(f"{mat_path} is not the official cars_annos.mat (an 'annotations' "
                           f"struct array with fields relative_im_path and class): {err}") from None
    return _split_by_class(paths, classes, lambda c: c <= 98, build)


def load_sop(root: Path, build) -> Splits:
    """Stanford Online Products: Ebay_train.txt (11,318 classes) and Ebay_test.txt (11,316)."""
    base = _locate(root, "Stanford_Online_Products", ("Ebay_train.txt", "Ebay_test.txt"),
                   "Stanford Online Products", "Stanford_Online_Products.zip from "
                   "https://cvgl.stanford.edu/projects/lifted_struct/")
    parts = []
    for name, train in (("Ebay_train.txt", True), ("Ebay_test.txt", False)):
        rows = _read_rows(base / name, 4, header=True)
        parts.append(build([base / r[3] for r in rows], [_int(r[1], base / name) for r in rows],
                           train))
    return Splits(*parts)


def load_digits(build) -> Splits:
    """scikit-learn's digits (8x8 scans that ship inside the package): train 0-4, test 5-9."""
    from sklearn.datasets import load_digits as sk_digits

    data = sk_digits()
    images = [Image.fromarray((img * (255.0 / 16.0)).astype(np.uint8)).convert("RGB")
              for img in data.images]
    return _split_by_class(images, data.target.tolist(), lambda c: c < 5, build)


def make_synthetic(cfg: dict) -> Splits:
    """Classes made of several local centres, the situation MPA's K proxies per class are for.

    Each class is a mixture of ``synthetic_centres`` Gaussian clusters whose centres are drawn
    independently, so a class is multi-modal and its modes sit among other classes' modes. A quarter
    of the input dimensions carry the centres; the rest is class-independent nuisance noise of unit
    variance that a network must learn to ignore (without it, raw-input nearest neighbours would
    already be perfect).
    """
    rng = np.random.default_rng(SYNTHETIC_DATA_SEED)
    dim = cfg["synthetic_dim"]
    signal = max(2, dim // 4)
    n_classes = cfg["synthetic_train_classes"] + cfg["synthetic_test_classes"]
    per_centre, centres = cfg["synthetic_samples"], cfg["synthetic_centres"]
    means = rng.normal(size=(n_classes, centres, signal))
    x = rng.normal(size=(n_classes, centres, per_centre, dim))
    x[..., :signal] = means[:, :, None, :] + cfg["synthetic_spread"] * x[..., :signal]
    x = torch.as_tensor(x.reshape(-1, dim), dtype=torch.float32)
    labels = np.repeat(np.arange(n_classes), centres * per_centre)
    train = labels < cfg["synthetic_train_classes"]
    return Splits(VectorDataset(x[torch.as_tensor(train)], labels[train].tolist()),
                  VectorDataset(x[torch.as_tensor(~train)], labels[~train].tolist()))


def load(cfg: dict) -> Splits:
    """The train and test splits that ``cfg`` names, with the protocol's transforms."""
    if cfg["dataset"] == "synthetic":
        return make_synthetic(cfg)
    caffe = cfg["backbone"] == "bn_inception"

    def build(items, labels, train):
        t = transforms.build(train, cfg["image_size"], cfg["resize_size"], cfg["crop_scale_min"],
                             cfg["hflip"], caffe)
        return ImageDataset(items, labels, t)

    if cfg["dataset"] == "digits":
        return load_digits(build)
    loader = {"cub": load_cub, "cars": load_cars, "sop": load_sop}[cfg["dataset"]]
    return loader(Path(cfg["data_root"]), build)
