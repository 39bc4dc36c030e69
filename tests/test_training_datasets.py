"""The dataset loaders on tiny fixture trees in the official on-disk layouts, and the transforms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from training import datasets, transforms
from training.config import build

SMALL = ["image_size=32", "resize_size=36"]


def _image(path, seed: int, size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


def make_cub(root, classes=(1, 2, 101, 102), per_class=2):
    base = root / "CUB_200_2011"
    images, labels, i = [], [], 0
    for c in classes:
        for j in range(per_class):
            i += 1
            rel = f"{c:03d}.Bird_{c}/Bird_{c}_{j:04d}.jpg"
            _image(base / "images" / rel, i)
            images.append(f"{i} {rel}")
            labels.append(f"{i} {c}")
    (base / "images.txt").write_text("\n".join(images) + "\n")
    (base / "image_class_labels.txt").write_text("\n".join(labels) + "\n")
    return base


def make_cars(root, classes=(1, 2, 99, 100), per_class=2):
    """cars_annos.mat as the Stanford release has it: a 1 x N struct array ``annotations`` with
    relative_im_path, bbox_x1, bbox_y1, bbox_x2, bbox_y2, class and test, and ``class_names``."""
    fields = ["relative_im_path", "bbox_x1", "bbox_y1", "bbox_x2", "bbox_y2", "class", "test"]
    entries = [(c, j) for c in classes for j in range(per_class)]
    ann = np.zeros((1, len(entries)), dtype=[(f, "O") for f in fields])
    for i, (c, j) in enumerate(entries, start=1):
        rel = f"car_ims/{i:06d}.jpg"
        _image(root / rel, 100 + i)
        ann[0, i - 1] = (rel, np.uint8(1), np.uint8(2), np.uint16(38), np.uint16(28),
                         np.uint8(c), np.uint8(j % 2))
    names = np.array([f"Make Model {c}" for c in range(1, 197)], dtype=object).reshape(1, -1)
    scipy.io.savemat(root / "cars_annos.mat", {"annotations": ann, "class_names": names})
    return root


def make_sop(root, train_classes=(1, 2), test_classes=(11319, 11320), per_class=2):
    base = root / "Stanford_Online_Products"
    i = 0
    for name, classes in (("Ebay_train.txt", train_classes), ("Ebay_test.txt", test_classes)):
        lines = ["image_id class_id super_class_id path"]
        for c in classes:
            for j in range(per_class):
                i += 1
                rel = f"bicycle_final/{c}_{j}.JPG"
                _image(base / rel, 200 + i)
                lines.append(f"{i} {c} 1 {rel}")
        (base / name).write_text("\n".join(lines) + "\n")
    return base


def _load(dataset, root, *extra):
    (cfg,) = build({"dataset": dataset, "data_root": str(root), "backbone": "bn_inception"},
                   SMALL + list(extra))
    return datasets.load(cfg)


@pytest.mark.parametrize("dataset,maker", [("cub", make_cub), ("cars", make_cars),
                                           ("sop", make_sop)])
def test_loader_splits_by_class_and_reads_images(tmp_path, dataset, maker):
    maker(tmp_path)
    splits = _load(dataset, tmp_path)
    assert len(splits.train) == 4 and len(splits.test) == 4
    assert splits.train.labels.tolist() == [0, 0, 1, 1]
    assert splits.test.labels.tolist() == [0, 0, 1, 1]
    assert splits.num_train_classes == 2
    x, y = splits.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y.item() == 0
    x, _ = splits.test[3]
    assert x.shape == (3, 32, 32)


def test_cub_train_and_test_hold_the_right_files(tmp_path):
    make_cub(tmp_path)
    splits = _load("cub", tmp_path)
    assert [p.parent.name for p in splits.train.items] == ["001.Bird_1"] * 2 + ["002.Bird_2"] * 2
    assert [p.parent.name for p in splits.test.items] == ["101.Bird_101"] * 2 + ["102.Bird_102"] * 2


@pytest.mark.parametrize("dataset,expected", [
    ("cub", ["CUB_200_2011/images.txt", "image_class_labels.txt"]),
    ("cars", ["cars_annos.mat", "car_ims"]),
    ("sop", ["Ebay_train.txt", "Ebay_test.txt"]),
])
def test_missing_dataset_names_the_expected_files(tmp_path, dataset, expected):
    with pytest.raises(datasets.DatasetError) as err:
        _load(dataset, tmp_path)
    for name in expected:
        assert name in str(err.value)


def test_malformed_cub_names_file_and_line(tmp_path):
    base = make_cub(tmp_path)
    with open(base / "images.txt", "a") as fh:
        fh.write("9 two words.jpg\n")
    with pytest.raises(datasets.DatasetError, match=r"images.txt, line 9: expected 2 fields"):
        _load("cub", tmp_path)


def test_malformed_cars_mat_names_the_file(tmp_path):
    make_cars(tmp_path)
    scipy.io.savemat(tmp_path / "cars_annos.mat", {"something_else": np.zeros(3)})
    with pytest.raises(datasets.DatasetError, match="cars_annos.mat is not the official"):
        _load("cars", tmp_path)


def test_malformed_sop_names_the_file(tmp_path):
    base = make_sop(tmp_path)
    (base / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 x 1 a.JPG\n")
    with pytest.raises(datasets.DatasetError, match="Ebay_test.txt: expected an integer"):
        _load("sop", tmp_path)


def test_unreadable_image_names_the_file(tmp_path):
    make_sop(tmp_path)
    bad = tmp_path / "Stanford_Online_Products" / "bicycle_final" / "1_0.JPG"
    bad.write_bytes(b"not a jpeg")
    splits = _load("sop", tmp_path)
    with pytest.raises(datasets.DatasetError, match=r"cannot read image .*1_0\.JPG"):
        splits.train[0]


def test_digits_split_five_and_five():
    (cfg,) = build({"dataset": "digits", "image_size": 16, "resize_size": 16})
    splits = datasets.load(cfg)
    assert len(splits.train) + len(splits.test) == 1797
    assert splits.num_train_classes == 5 and int(splits.test.labels.max()) == 4
    assert splits.train[0][0].shape == (3, 16, 16)


def test_synthetic_classes_are_disjoint_mixtures():
    (cfg,) = build({"dataset": "synthetic", "backbone": "mlp", "synthetic_train_classes": 3,
                    "synthetic_test_classes": 2, "synthetic_centres": 3, "synthetic_samples": 5,
                    "synthetic_dim": 8})
    splits = datasets.load(cfg)
    assert len(splits.train) == 3 * 3 * 5 and len(splits.test) == 2 * 3 * 5
    assert not torch.equal(splits.train.vectors[:2], splits.test.vectors[:2])
    again = datasets.load(cfg)
    assert torch.equal(splits.train.vectors, again.train.vectors)


def test_transforms_shapes_and_caffe_convention():
    img = Image.fromarray(np.full((30, 50, 3), (10, 20, 30), dtype=np.uint8))
    train = transforms.build(True, 24, 28, 0.08, True, caffe=False)
    test = transforms.build(False, 24, 28, 0.08, True, caffe=True)
    assert train(img).shape == (3, 24, 24)
    x = test(img)
    assert x.shape == (3, 24, 24)
    # BGR, 0-255, minus (104, 117, 128)
    assert torch.allclose(x[:, 12, 12], torch.tensor([30 - 104.0, 20 - 117.0, 10 - 128.0]))
    # Resize(28) keeps the aspect ratio (shorter side 28): 30x50 → 28x46, centre crop 24.
    assert transforms.Resize(28)(img).size == (46, 28)
    assert transforms.CenterCrop(24)(transforms.Resize(28)(img)).size == (24, 24)


def test_random_resized_crop_stays_inside_and_follows_the_torch_generator():
    crop = transforms.RandomResizedCrop(8, scale=(0.2, 1.0))
    torch.manual_seed(3)
    boxes = [crop.box(50, 30) for _ in range(20)]
    for left, top, w, h in boxes:
        assert 0 <= left and left + w <= 50 and 0 <= top and top + h <= 30
    torch.manual_seed(3)
    assert boxes == [crop.box(50, 30) for _ in range(20)]
