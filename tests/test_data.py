"""Data sources (builtin digits, ImageNet-style folders), views, samplers and loaders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

TENCH, GOLDFISH, BRAMBLING = "n01440764", "n01443537", "n01530575"  # ImageNet classes 0, 1, 10


def write_digit_folder(root: Path, split: str, classes: dict[str, list[int]], suffix: str = ".png") -> None:
    """Write digits (by index into sklearn's 1,797) as 8-bit greyscale files, one folder per class."""
    from hooked_vit.data.digits import digits_arrays

    images = digits_arrays()[0]
    for cls, indices in classes.items():
        folder = root / split / cls
        folder.mkdir(parents=True)
        for i in indices:
            Image.fromarray(np.kron(images[i], np.ones((4, 4), np.uint8))).save(folder / f"img{i}{suffix}")


@pytest.fixture(scope="module")
def data():
    import hooked_vit.data as data

    return data


@pytest.fixture(scope="module")
def digits_val(data):
    return data.load_dataset("digits", split="val")


@pytest.fixture(scope="module")
def digits_train(data):
    return data.load_dataset("digits", split="train")


@pytest.fixture
def small_transform():
    from hooked_vit.data.transforms import transform_from_preprocessing

    return transform_from_preprocessing({"input_size": [3, 16, 16], "crop_pct": 1.0, "interpolation": "bilinear"})


def test_digits_splits_are_fixed_stratified_and_disjoint(data, digits_val, digits_train):
    from hooked_vit.data.digits import digits_split_indices

    train, val = digits_split_indices("train"), digits_split_indices("val")
    assert (len(digits_train), len(digits_val)) == (1437, 360)
    assert not set(train.tolist()) & set(val.tolist())
    assert sorted(train.tolist() + val.tolist()) == list(range(1797))
    assert digits_val.class_counts().tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert digits_val.class_names == [str(d) for d in range(10)] and digits_val.num_classes == 10
    image, label = digits_val[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32 and isinstance(label, int)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])  # grey replicated to RGB
    again = data.load_dataset("digits", split="val")
    assert torch.equal(again.tensors()[0], digits_val.tensors()[0])
    with pytest.raises(ValueError, match="splits train, val, all"):
        data.load_dataset("digits", split="test")


def test_digits_preprocessing_is_the_train_pixel_statistics():
    from hooked_vit.data.digits import DIGITS_MEAN, DIGITS_STD, digits_arrays, digits_split_indices

    pixels = digits_arrays()[0][digits_split_indices("train").numpy()] / 255.0
    assert pixels.mean() == pytest.approx(DIGITS_MEAN, abs=1e-4)
    assert pixels.std() == pytest.approx(DIGITS_STD, abs=1e-4)


def test_transform_comes_from_model_or_argument(data, digits_val, small_transform):
    import timm

    resized = data.load_dataset("digits", split="val", transform=small_transform)
    assert resized[0][0].shape == (3, 16, 16)
    timm_model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=16, depth=1,
                                                                 num_heads=1, num_classes=10)
    timm_model.pretrained_cfg = dict(data.DIGITS_PREPROCESSING)
    via_model = data.load_dataset("digits", split="val", model=timm_model)
    assert torch.equal(via_model.tensors()[0], digits_val.tensors()[0])
    with pytest.raises(ValueError, match="not both"):
        data.load_dataset("digits", model=timm_model, transform=small_transform)


def test_imagenet_folder_has_imagenet_labels_names_and_subsets(data, tmp_path, small_transform):
    write_digit_folder(tmp_path, "val", {TENCH: [0, 1, 2], GOLDFISH: [3, 4], BRAMBLING: [5]}, suffix=".JPEG")
    dataset = data.load_dataset(tmp_path, split="val", transform=small_transform)
    assert dataset.name == "imagenet" and dataset.split == "val" and len(dataset) == 6
    assert dataset.num_classes == 1000 and dataset.class_ids[:2] == [TENCH, GOLDFISH]
    assert dataset.class_names[0].startswith("tench") and dataset.class_names[10].startswith("brambling")
    assert dataset.labels.tolist() == [0, 0, 0, 1, 1, 10]
    image, label = dataset[5]
    assert image.shape == (3, 16, 16) and label == 10
    impact = data.load_dataset(tmp_path, split="val", transform=small_transform, subset="impact100")
    assert impact.labels.tolist() == [0, 0, 0, 1, 1]  # brambling is not in impact100
    assert dataset.select_classes([GOLDFISH, 10]).labels.tolist() == [1, 1, 10]


def test_folder_with_other_class_names_uses_sorted_folder_names(data, tmp_path, small_transform):
    write_digit_folder(tmp_path, "train", {"dog": [0, 1], "cat": [2]})
    dataset = data.load_dataset(str(tmp_path), split="train", transform=small_transform)
    assert dataset.class_names == ["cat", "dog"] and dataset.labels.tolist() == [0, 1, 1]
    assert dataset.name == tmp_path.name


def test_folder_errors_say_what_is_wrong_and_what_is_right(data, tmp_path, small_transform):
    with pytest.raises(FileNotFoundError, match=r"unknown dataset source .*Did you mean 'digits'"):
        data.load_dataset("digitz")
    with pytest.raises(FileNotFoundError, match="root/<split>/<wnid>"):
        data.load_image_folder(tmp_path / "missing")
    write_digit_folder(tmp_path, "train", {TENCH: [0]})
    with pytest.raises(FileNotFoundError, match=r"has no 'val' folder \(it has: train\)"):
        data.load_dataset(tmp_path, split="val")
    (tmp_path / "val").mkdir()
    with pytest.raises(FileNotFoundError, match="has no class folders"):
        data.load_dataset(tmp_path, split="val")
    (tmp_path / "train" / GOLDFISH).mkdir()
    (tmp_path / "train" / GOLDFISH / "notes.txt").write_text("not an image")
    with pytest.raises(FileNotFoundError, match=rf"{GOLDFISH}'? contain no images .*at least one image"):
        data.load_dataset(tmp_path, split="train")
    (tmp_path / "train" / GOLDFISH / "broken.JPEG").write_bytes(b"\xff\xd8\xff\xe0 truncated")
    dataset = data.load_dataset(tmp_path, split="train", transform=small_transform)
    assert dataset[0][0].shape == (3, 16, 16)
    with pytest.raises(data.CorruptImageError, match=r"broken\.JPEG"):
        dataset[1]


def test_impact100_is_100_imagenet_classes_in_13_groups(data):
    groups = data.subset_groups("impact100")
    assert len(groups) == 13 and sorted({len(g) for g in groups.values()}) == [7, 8]
    wnids = data.named_subset("impact100")
    assert len(wnids) == len(set(wnids)) == 100 and set(wnids) <= set(data.imagenet_wnids())
    assert wnids == tuple(w for g in groups.values() for w in g)
    with pytest.raises(ValueError, match="unknown named subset"):
        data.named_subset("impact1000")


def test_views_keep_the_label_space(data, digits_val):
    threes = digits_val.select_classes([3, "7"])
    assert set(threes.labels.tolist()) == {3, 7} and threes.num_classes == 10
    assert len(threes) == 37 + 36
    head = digits_val.subset([2, 0])
    assert torch.equal(head[0][0], digits_val[2][0]) and head.labels.tolist() == digits_val.labels[[2, 0]].tolist()
    with pytest.raises(ValueError, match="ImageNet-1k label space"):
        digits_val.select_classes("impact100")
    with pytest.raises(ValueError, match="unknown class"):
        digits_val.class_index("eleven")


def test_class_vs_rest_is_balanced_and_seeded(data, digits_val):
    split = data.class_vs_rest(digits_val, 3, seed=0)
    assert split.target == 3 and len(split.dataset) == 2 * 37
    assert torch.equal(split.is_target, split.dataset.labels == 3)
    rest = split.dataset.labels[~split.is_target]
    counts = torch.bincount(rest, minlength=10)
    assert counts[3] == 0 and counts.sum() == 37 and counts[counts > 0].min() >= 4 and counts.max() <= 5
    assert torch.equal(data.class_vs_rest(digits_val, "3", seed=0).dataset.store_indices, split.dataset.store_indices)
    assert not torch.equal(data.class_vs_rest(digits_val, 3, seed=1).dataset.store_indices, split.dataset.store_indices)
    assert len(data.class_vs_rest(digits_val, 3, n=10).dataset) == 20
    with pytest.raises(ValueError, match="choose 1 <= n <= 37"):
        data.class_vs_rest(digits_val, 3, n=38)


def test_calibration_sample_is_balanced_and_seeded(data, digits_train):
    sample = data.calibration_sample(digits_train, 25, seed=0)
    assert len(sample) == 25 and set(torch.bincount(sample.labels, minlength=10).tolist()) == {2, 3}
    assert sorted(sample.labels[:10].tolist()) == list(range(10))  # every prefix is balanced
    assert torch.equal(data.calibration_sample(digits_train, 25, seed=0).store_indices, sample.store_indices)
    assert not torch.equal(data.calibration_sample(digits_train, 25, seed=1).store_indices, sample.store_indices)
    with pytest.raises(ValueError, match="1 <= n <= 1437"):
        data.calibration_sample(digits_train, 5000)


def test_train_val_split_of_any_dataset(data, digits_val):
    train, val = data.train_val_split(digits_val, val_fraction=0.25, seed=0)
    assert len(train) == 270 and len(val) == 90
    assert not set(train.store_indices.tolist()) & set(val.store_indices.tolist())


def test_loaders_are_sized_for_the_device(data, digits_val, tmp_path, small_transform):
    loader = data.make_loader(digits_val, device="cpu")
    assert loader.num_workers == 0 and not loader.pin_memory and loader.batch_size == 64
    images, labels = next(iter(loader))
    assert images.shape == (64, 3, 32, 32) and labels.shape == (64,)
    gpu_loader = data.make_loader(digits_val, device="cuda")  # constructing needs no GPU
    assert gpu_loader.pin_memory and gpu_loader.batch_size == 256
    write_digit_folder(tmp_path, "val", {"a": [0, 1], "b": [2]})
    files = data.load_dataset(tmp_path, transform=small_transform)
    assert data.default_num_workers(files, "cpu") >= 1 and data.default_num_workers(files, "cuda") <= 8
    batch, batch_labels = next(iter(data.make_loader(files, batch_size=4, device="cpu")))  # through a worker
    assert batch.shape == (3, 3, 16, 16) and batch_labels.tolist() == [0, 0, 1]
    first = [next(iter(data.make_loader(digits_val, shuffle=True, seed=s)))[1] for s in (0, 0, 1)]
    assert torch.equal(first[0], first[1]) and not torch.equal(first[0], first[2])
