"""ImageFolder indexing (local and S3) and the decoding Dataset."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest
import torch
from PIL import Image

from anchornet import storage
from anchornet.image_folder import (
    ImageFolderDataset,
    ImageFolderIndex,
    evenly_spaced,
    holdout_digest,
    holdout_indices,
    scan_image_folder,
)
from anchornet.preprocessing import Preprocessing


def _png(size: tuple[int, int] = (120, 100), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size).save(buffer, format="PNG")
    return buffer.getvalue()


def _make_tree(write, root: str) -> None:
    for cls, files in {"b_cls": ["2.png", "1.PNG"], "a_cls": ["x.png"], "c_empty": []}.items():
        for name in files:
            write(storage.join(root, cls, name), _png())
    write(storage.join(root, "a_cls", "notes.txt"), b"ignored")


def test_local_index_is_sorted_and_labelled(tmp_path: Path) -> None:
    _make_tree(storage.write_bytes, str(tmp_path))
    (tmp_path / "c_empty").mkdir()
    index = scan_image_folder(tmp_path)
    assert index.classes == ["a_cls", "b_cls", "c_empty"]
    assert index.items == [("a_cls/x.png", 0), ("b_cls/1.PNG", 1), ("b_cls/2.png", 1)]
    dataset = ImageFolderDataset(index, Preprocessing(image_size=96, resize_size=100))
    image, label = dataset[2]
    assert image.shape == (3, 96, 96) and label == 1
    # Samples come from the dataset's flat arrays, never from index.items: reading those tuples in a forked
    # DataLoader process would copy the whole list into it (~180 MB per process for ImageNet's paths).
    dataset.index = ImageFolderIndex(index.root, index.classes, [])
    assert torch.equal(dataset[2][0], image) and dataset[-1][1] == 1 and dataset[0][1] == 0 and len(dataset) == 3
    with pytest.raises(IndexError):
        dataset[3]


def test_given_class_list(tmp_path: Path) -> None:
    _make_tree(storage.write_bytes, str(tmp_path))
    index = scan_image_folder(tmp_path, classes=["z_first", "a_cls", "b_cls"])
    assert index.items[0] == ("a_cls/x.png", 1)
    with pytest.raises(ValueError, match="not in the given class list"):
        scan_image_folder(tmp_path, classes=["a_cls"])


def test_bad_trees(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="input not found"):
        scan_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class directories"):
        scan_image_folder(tmp_path)
    (tmp_path / "cls").mkdir()
    with pytest.raises(ValueError, match="no images"):
        scan_image_folder(tmp_path)
    # a file name that is not UTF-8 (Linux allows any bytes): pyarrow cannot list it
    with open(os.path.join(os.fsencode(tmp_path / "cls"), b"bad\xff.png"), "wb") as file:
        file.write(b"x")
    with pytest.raises(ValueError, match=r"not valid UTF-8 \(.*cls/bad\\xff\.png\): rename it"):
        scan_image_folder(tmp_path)


def _index(n: int) -> ImageFolderIndex:
    return ImageFolderIndex("root", ["a", "b"], [(f"{'ab'[i % 2]}/{i:03d}.png", i % 2) for i in range(n)])


def test_holdout_indices_are_seeded_sorted_and_nested() -> None:
    index = _index(20)
    # Pinned values: the training jobs and jobs/evaluate.py, in other processes or on other machines, must draw
    # exactly these images (a torch that changed its seeded randperm would fail here, not silently).
    assert holdout_indices(index, 5, 0) == [4, 5, 7, 13, 19]
    assert holdout_indices(index, 5, 1) == [2, 5, 11, 13, 19]
    assert holdout_indices(index, 5, 0) == holdout_indices(_index(20), 5, 0)
    picks = holdout_indices(index, 8, 3)
    assert picks == sorted(set(picks)) and len(picks) == 8 and all(0 <= i < 20 for i in picks)
    assert set(holdout_indices(index, 3, 3)) <= set(picks)  # a smaller holdout of the same seed is a subset
    assert holdout_indices(index, 0, 0) == [] and holdout_indices(index, 99, 0) == list(range(20))
    with pytest.raises(ValueError, match="holdout size"):
        holdout_indices(index, -1, 0)


def test_holdout_digest_names_the_set_not_the_order() -> None:
    assert holdout_digest(["b/1.png", "a/2.png"]) == holdout_digest(["a/2.png", "b/1.png"])
    assert holdout_digest(["a/2.png"]) != holdout_digest(["a/3.png"])


@pytest.mark.slow
def test_s3_tree(s3_bucket: str) -> None:
    root = storage.join(s3_bucket, "train")
    _make_tree(storage.write_bytes, root)
    index = scan_image_folder(root)
    assert index.classes == ["a_cls", "b_cls"]
    assert [item for item, _ in index.items] == ["a_cls/x.png", "b_cls/1.PNG", "b_cls/2.png"]
    assert ImageFolderDataset(index)[0][0].shape == (3, 224, 224)
    with pytest.raises(FileNotFoundError, match="input not found"):
        scan_image_folder(storage.join(s3_bucket, "nothing-here"))


def test_evenly_spaced_spreads_over_the_items_in_order() -> None:
    assert evenly_spaced(range(10), 5) == [0, 2, 4, 6, 8]
    assert evenly_spaced(range(6), 2) == [0, 3]
    assert evenly_spaced(list("abc"), 7) == ["a", "b", "c"]  # all of them when there are fewer
    assert evenly_spaced([], 3) == []
