"""Patch selection (greedy NMS), cropping and the random baseline."""

from __future__ import annotations

import pytest
import torch
from torchvision.ops import box_iou, roi_align

from anchornet import ReceptiveField, crop_patches, random_patches, select_patches
from anchornet.patches import _gather_windows, _slice_windows

pytestmark = pytest.mark.math

RF = ReceptiveField(size=95, stride=8)


def _iou(a: tuple[int, ...], b: tuple[int, ...]) -> float:
    w = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = w * h
    area = (a[2] - a[0]) * (a[3] - a[1])
    return inter / (2 * area - inter)


def _reference(cam: torch.Tensor, k: int, theta: float) -> list[int]:
    """Paper Sec. 3.3 as a plain loop over one image's cells."""
    rows, cols = cam.shape
    order = sorted(range(rows * cols), key=lambda i: -float(cam.reshape(-1)[i]))
    accepted: list[int] = []
    for cell in order:
        box = RF.box(cell // cols, cell % cols)
        if all(_iou(box, RF.box(a // cols, a % cols)) <= theta for a in accepted):
            accepted.append(cell)
        if len(accepted) == k:
            break
    return accepted


@pytest.mark.parametrize(("grid", "k", "theta"), [((17, 17), 4, 0.3), ((17, 17), 8, 0.5), ((9, 14), 6, 0.1)])
def test_matches_a_brute_force_reference(grid: tuple[int, int], k: int, theta: float) -> None:
    cam = torch.randn(16, *grid)
    sel = select_patches(cam, RF, num_patches=k, iou_threshold=theta)
    for b in range(cam.shape[0]):
        expected = _reference(cam[b], k, theta)
        got = sel.cells[b][sel.valid[b]].tolist()
        assert got == expected
        assert sel.num_valid[b] == len(expected)


def test_boxes_overlap_at_most_the_threshold_and_start_at_the_argmax() -> None:
    cam = torch.randn(32, 17, 17)
    sel = select_patches(cam, RF, num_patches=4, iou_threshold=0.3)
    assert sel.boxes.shape == (32, 4, 4)
    assert bool(sel.valid.all())
    for b in range(32):
        iou = box_iou(sel.boxes[b], sel.boxes[b])
        assert (iou.triu(diagonal=1) <= 0.3 + 1e-6).all()
        row, col = divmod(int(cam[b].argmax()), 17)
        assert sel.boxes[b, 0].tolist() == list(RF.box(row, col))
        assert sel.scores[b, 0] == cam[b].max()
        assert (sel.scores[b].diff() <= 0).all(), "best first"


def test_fewer_survivors_are_reported_not_padded() -> None:
    cam = torch.randn(2, 2, 2)  # a 2 x 2 grid: windows offset by 8 px overlap far above 0.3
    sel = select_patches(cam, RF, num_patches=4, iou_threshold=0.3)
    assert sel.num_valid.tolist() == [1, 1]
    assert sel.cells[:, 1:].eq(-1).all()
    assert torch.isnan(sel.boxes[:, 1:]).all() and torch.isnan(sel.scores[:, 1:]).all()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="rows, cols"):
        select_patches(torch.randn(17, 17), RF)
    with pytest.raises(ValueError, match="num_patches"):
        select_patches(torch.randn(1, 17, 17), RF, num_patches=0)
    with pytest.raises(ValueError, match="iou_threshold"):
        select_patches(torch.randn(1, 17, 17), RF, iou_threshold=1.5)
    with pytest.raises(ValueError, match=r"floating-point scores, got torch\.int64"):
        select_patches(torch.randint(0, 9, (1, 17, 17)), RF)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_crop_parity_with_slicing(dtype: torch.dtype) -> None:
    images = (torch.rand(3, 3, 224, 160) * 255).to(dtype)
    sel = select_patches(torch.randn(3, 17, 9), RF, num_patches=4)
    crops = crop_patches(images, sel.boxes)
    assert crops.shape == (3, 4, 3, 95, 95) and crops.dtype == dtype
    for b in range(3):
        for j in range(4):
            x0, y0, x1, y1 = sel.boxes[b, j].long().tolist()
            assert torch.equal(crops[b, j], images[b, :, y0:y1, x0:x1])


def test_crop_parity_with_roi_align() -> None:
    images = torch.rand(2, 3, 224, 224)
    sel = select_patches(torch.randn(2, 17, 17), RF, num_patches=3)
    rois = torch.cat([torch.arange(2).repeat_interleave(3)[:, None].float(), sel.boxes.reshape(-1, 4)], dim=1)
    expected = roi_align(images, rois, output_size=95, spatial_scale=1.0, sampling_ratio=1, aligned=True)
    torch.testing.assert_close(crop_patches(images, sel.boxes).reshape(-1, 3, 95, 95), expected)


def test_crop_invalid_slots_are_zero() -> None:
    images = torch.rand(2, 3, 102, 102)
    sel = select_patches(torch.randn(2, 1, 1), RF, num_patches=2)
    crops = crop_patches(images, sel.boxes)
    assert torch.equal(crops[:, 0], images[:, :, :95, :95])
    assert crops[:, 1].eq(0).all()


def test_crop_bad_boxes() -> None:
    images = torch.rand(1, 3, 224, 224)
    with pytest.raises(ValueError, match="inside"):
        crop_patches(images, torch.tensor([[[150.0, 0.0, 245.0, 95.0]]]))
    with pytest.raises(ValueError, match="integer"):
        crop_patches(images, torch.tensor([[[0.5, 0.0, 95.5, 95.0]]]))
    with pytest.raises(ValueError, match="95 x 95"):
        crop_patches(images, torch.tensor([[[0.0, 0.0, 95.0, 95.0], [0.0, 0.0, 90.0, 95.0]]]))
    with pytest.raises(ValueError, match=r"\(B, k, 4\)"):
        crop_patches(images, torch.zeros(1, 4))


def test_random_patches_are_seeded_distinct_and_uniform() -> None:
    def draw(seed: int) -> torch.Tensor:
        return random_patches(RF, (224, 224), 512, 4, generator=torch.Generator().manual_seed(seed)).cells

    a, b, c = draw(1), draw(1), draw(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (512, 4) and (a >= 0).all() and (a < 289).all()
    assert all(len(set(row.tolist())) == 4 for row in a), "cells are distinct within an image"
    counts = torch.bincount(a.reshape(-1), minlength=289).float()
    assert counts.std() / counts.mean() < 0.5  # 2048 draws over 289 cells: roughly flat


def test_random_patches_shapes_match_selection() -> None:
    cam = torch.randn(3, 17, 17)
    sel = random_patches(RF, (224, 224), 3, 4, generator=torch.Generator().manual_seed(0), cam=cam)
    ref = select_patches(cam, RF, 4)
    assert sel.boxes.shape == ref.boxes.shape and sel.scores.shape == ref.scores.shape
    assert torch.equal(sel.scores, torch.gather(cam.reshape(3, -1), 1, sel.cells))
    crops = crop_patches(torch.rand(3, 3, 224, 224), sel.boxes)
    assert crops.shape == (3, 4, 3, 95, 95)


# On the CPU torchvision's batched_nms offsets the boxes per image up to 4000 coordinates (batches of 1 to 3 at
# 17 x 17) and loops over the images above that (4 and more): both paths, alone and with other images.
@pytest.mark.parametrize("batch", [1, 2, 3, 4, 8, 16])
def test_tied_scores_give_the_same_cells_alone_and_in_any_batch(batch: int) -> None:
    constant = torch.zeros(1, 17, 17)  # a grey image: one CAM value in every cell
    alone = select_patches(constant, RF).cells[0]
    assert alone.tolist() == _reference(constant[0], 4, 0.3)
    assert alone.tolist() == sorted(alone.tolist()) and alone[0] == 0, "ties are visited lowest cell first"
    for position in {0, batch // 2, batch - 1}:
        cam = torch.randn(batch, 17, 17)
        cam[position] = constant[0]
        assert torch.equal(select_patches(cam, RF).cells[position], alone)


def test_partial_ties_match_the_reference_alone_and_batched() -> None:
    cam = torch.randint(0, 3, (16, 17, 17)).float()
    sel = select_patches(cam, RF)
    for b in range(cam.shape[0]):
        assert sel.cells[b].tolist() == _reference(cam[b], 4, 0.3)
        assert torch.equal(select_patches(cam[b : b + 1], RF).cells[0], sel.cells[b])


def test_float64_scores_stay_best_first_below_float32_resolution() -> None:
    cam = torch.zeros(1, 17, 17, dtype=torch.float64)
    cam[0, 0, 0], cam[0, 16, 16] = 1.0, 1.0 + 1e-12
    sel = select_patches(cam, RF, num_patches=2)
    assert sel.cells.tolist() == [[288, 0]]
    assert sel.scores.dtype == torch.float64 and sel.scores.tolist() == [[1.0 + 1e-12, 1.0]]
    assert (sel.scores.diff(dim=1) <= 0).all()


def test_empty_batches_give_empty_selections_and_crops() -> None:
    for sel in (
        select_patches(torch.randn(0, 17, 17), RF),
        random_patches(RF, (224, 224), 0, 4, cam=torch.randn(0, 17, 17)),
        random_patches(RF, (224, 224), 0, 4),
    ):
        assert sel.boxes.shape == (0, 4, 4)
        assert sel.cells.shape == sel.scores.shape == sel.valid.shape == (0, 4)
        assert sel.num_valid.shape == (0,)
        assert crop_patches(torch.rand(0, 3, 224, 224), sel.boxes, size=95).shape == (0, 4, 3, 95, 95)


def test_random_patches_check_the_cam_shape() -> None:
    with pytest.raises(ValueError, match=r"cam must be \(2, 17, 17\)"):
        random_patches(RF, (224, 224), 2, 4, cam=torch.randn(3, 17, 17))


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_crop_invalid_slots_are_zero_even_for_non_finite_pixels(value: float) -> None:
    images = torch.full((2, 3, 102, 102), value)
    sel = select_patches(torch.randn(2, 1, 1), RF, num_patches=2)
    crops = crop_patches(images, sel.boxes)
    torch.testing.assert_close(crops[:, 0], images[:, :, :95, :95], equal_nan=True)
    assert crops[:, 1].eq(0).all()


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_crop_by_slices_and_by_one_gather_agree(dtype: torch.dtype, channels_last: bool) -> None:
    """The CPU path (one slice per window) and the other devices' path (one gather) give the same crops."""
    generator = torch.Generator().manual_seed(3)
    images = (torch.rand(5, 3, 224, 224, generator=generator) * 255).to(dtype)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    if dtype.is_floating_point:
        images[2] = float("nan")  # invalid slots stay zeros on both paths
    sel = random_patches(RF, (224, 224), 5, num_patches=300, generator=generator)  # 289 cells: 11 invalid
    safe = torch.where(sel.valid[..., None], sel.boxes, torch.tensor([0.0, 0.0, 95.0, 95.0])).long()
    by_slices = _slice_windows(images, safe, sel.valid, 95)
    by_gather = _gather_windows(images, safe, sel.valid, 95)
    torch.testing.assert_close(by_slices, by_gather, rtol=0, atol=0, equal_nan=True)
    assert torch.equal(crop_patches(images, sel.boxes).isnan(), by_slices.isnan())
    assert by_slices[:, -11:].eq(0).all() and by_gather[:, -11:].eq(0).all()
    # a channels-last batch gives crops whose memory is (K, K, C): encoders and NHWC convolutions read them as is
    assert by_slices[0, 0].permute(1, 2, 0).is_contiguous() == channels_last
