"""Patch selection (greedy NMS over the CAM cells, paper Sec. 3.3), cropping and the random baseline."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torchvision.ops import batched_nms

from anchornet.receptive_field import ReceptiveField

__all__ = ["PatchSelection", "crop_patches", "random_patches", "select_patches"]


@dataclass(frozen=True)
class PatchSelection:
    """Up to ``k`` patches per image, best first.

    Attributes:
        boxes: half-open pixel windows ``(x0, y0, x1, y1)``, float ``(B, k, 4)``; NaN in invalid slots.
        cells: flat cell index ``row * cols + col``, ``(B, k)``; -1 in invalid slots.
        scores: CAM score of each cell, ``(B, k)``; NaN in invalid slots (and for random patches without a CAM).
        valid: ``(B, k)`` bool, true for the first ``num_valid[b]`` slots of image ``b``.
    """

    boxes: torch.Tensor
    cells: torch.Tensor
    scores: torch.Tensor
    valid: torch.Tensor

    @property
    def num_valid(self) -> torch.Tensor:
        """Number of valid patches per image, ``(B,)``: fewer than ``k`` when NMS left fewer cells."""
        return self.valid.sum(dim=1)


def select_patches(
    cam: torch.Tensor, receptive_field: ReceptiveField, num_patches: int = 4, iou_threshold: float = 0.3
) -> PatchSelection:
    """Greedy NMS over the CAM cells of each image, best first (paper Sec. 3.3).

    Cells are visited from the highest CAM score down, equal scores in cell order (lower index first); a cell's
    window is accepted when its IoU with every accepted window is at most ``iou_threshold``; selection stops
    after ``num_patches`` windows. Images where fewer windows survive get invalid slots (see ``PatchSelection``),
    never duplicates. An image's patches do not depend on the rest of the batch.

    Args:
        cam: ``(B, rows, cols)`` scores, e.g. from ``class_activation_map``.
        receptive_field: the network's ``ReceptiveField`` (maps cells to windows).
    """
    if cam.dim() != 3:
        raise ValueError(f"cam must be (B, rows, cols), got shape {tuple(cam.shape)}")
    if not cam.is_floating_point():
        raise ValueError(f"cam must hold floating-point scores, got {cam.dtype}")
    if num_patches < 1:
        raise ValueError(f"num_patches must be at least 1, got {num_patches}")
    if not 0.0 <= iou_threshold <= 1.0:
        raise ValueError(f"iou_threshold must be in [0, 1], got {iou_threshold}")
    batch, rows, cols = cam.shape
    cells_per_image = rows * cols
    flat_cam = cam.detach().reshape(batch, cells_per_image)
    all_boxes = receptive_field.cell_boxes(rows, cols, cam.device)
    # NMS sees each cell's rank, not its score: a total order within every image (ties broken by cell index,
    # which batched_nms's unstable sort would not keep) and exact for any CAM dtype.
    order = flat_cam.argsort(dim=1, descending=True, stable=True)
    positions = torch.arange(cells_per_image, device=cam.device).expand(batch, -1)
    cell_rank = torch.empty_like(order).scatter_(1, order, positions)
    image_of = torch.arange(batch, device=cam.device).repeat_interleave(cells_per_image)
    keep = batched_nms(all_boxes.repeat(batch, 1), -cell_rank.reshape(-1).float(), image_of, iou_threshold)
    # `keep` is sorted by rank across all images; group it by image, keeping that order inside each group.
    image_of_keep = image_of[keep]
    grouped = torch.sort(image_of_keep, stable=True).indices
    keep, image_of_keep = keep[grouped], image_of_keep[grouped]
    first = torch.searchsorted(image_of_keep, image_of_keep, right=False)
    rank = torch.arange(keep.numel(), device=cam.device) - first
    take = rank < num_patches
    keep, image_of_keep, rank = keep[take], image_of_keep[take], rank[take]

    cells = torch.full((batch, num_patches), -1, dtype=torch.long, device=cam.device)
    cells[image_of_keep, rank] = keep - image_of_keep * cells_per_image
    valid = cells >= 0
    safe = cells.clamp(min=0)
    boxes = all_boxes[safe].masked_fill(~valid[..., None], float("nan"))
    out_scores = torch.gather(cam.reshape(batch, cells_per_image), 1, safe).masked_fill(~valid, float("nan"))
    return PatchSelection(boxes=boxes, cells=cells, scores=out_scores, valid=valid)


def random_patches(
    receptive_field: ReceptiveField,
    image_size: tuple[int, int],
    batch_size: int,
    num_patches: int = 4,
    *,
    generator: torch.Generator | None = None,
    cam: torch.Tensor | None = None,
) -> PatchSelection:
    """The random-patch baseline (paper Table 3): ``num_patches`` distinct grid cells per image.

    Each image draws its cells uniformly at random without replacement from the ``rows x cols`` grid (a
    random permutation of the cells, truncated), independently of the others and with no IoU constraint.
    Pass a seeded ``generator`` for reproducible draws. When ``cam`` is given, ``scores`` holds its values at
    the drawn cells (``cam`` is ``(batch_size, rows, cols)``); otherwise NaN.
    """
    rows, cols = receptive_field.grid(*image_size)
    cells_per_image = rows * cols
    if num_patches < 1:
        raise ValueError(f"num_patches must be at least 1, got {num_patches}")
    if cam is not None and tuple(cam.shape) != (batch_size, rows, cols):
        raise ValueError(f"cam must be ({batch_size}, {rows}, {cols}) for this batch, got shape {tuple(cam.shape)}")
    device = generator.device if generator is not None else None
    noise = torch.rand(batch_size, cells_per_image, generator=generator, device=device)
    k = min(num_patches, cells_per_image)
    cells = torch.full((batch_size, num_patches), -1, dtype=torch.long, device=noise.device)
    cells[:, :k] = noise.argsort(dim=1, stable=True)[:, :k]
    valid = cells >= 0
    safe = cells.clamp(min=0)
    boxes = receptive_field.cell_boxes(rows, cols, noise.device)[safe].masked_fill(~valid[..., None], float("nan"))
    if cam is not None:
        flat_cam = cam.reshape(batch_size, cells_per_image).to(noise.device)
        scores = torch.gather(flat_cam, 1, safe).masked_fill(~valid, float("nan"))
    else:
        scores = torch.full((batch_size, num_patches), float("nan"), device=noise.device)
    return PatchSelection(boxes=boxes, cells=cells, scores=scores, valid=valid)


def crop_patches(images: torch.Tensor, boxes: torch.Tensor, size: int | None = None) -> torch.Tensor:
    """Cut ``size x size`` windows out of each image, exact pixels, any dtype.

    Args:
        images: ``(B, C, H, W)``.
        boxes: half-open integer-valued windows ``(x0, y0, x1, y1)``, ``(B, k, 4)``, all ``size`` wide and
            high and inside the image. Rows with NaN (invalid slots of a ``PatchSelection``) give zero crops.
        size: window side; read from the boxes when omitted.

    Returns:
        ``(B, k, C, size, size)``; equal to ``images[b, :, y0:y1, x0:x1]`` for each box. From channels-last
        images, each crop is channels-last too (its memory is ``(size, size, C)``).
    """
    if images.dim() != 4 or boxes.dim() != 3 or boxes.shape[-1] != 4 or boxes.shape[0] != images.shape[0]:
        raise ValueError(
            f"expected images (B, C, H, W) and boxes (B, k, 4), got {tuple(images.shape)} and {tuple(boxes.shape)}"
        )
    height, width = images.shape[-2:]
    valid = ~torch.isnan(boxes).any(dim=-1)
    if size is None:
        if not valid.any():
            raise ValueError("size is required when no box is valid")
        size = int(boxes[valid][0, 2] - boxes[valid][0, 0])
    safe = torch.where(valid[..., None], boxes, torch.tensor([0.0, 0.0, size, size], device=boxes.device))
    if not torch.equal(safe, safe.round()):
        raise ValueError("boxes must have integer pixel coordinates")
    safe = safe.long()
    if ((safe[..., 2] - safe[..., 0]) != size).any() or ((safe[..., 3] - safe[..., 1]) != size).any():
        raise ValueError(f"every box must be {size} x {size} pixels")
    if (safe[..., :2] < 0).any() or (safe[..., 2] > width).any() or (safe[..., 3] > height).any():
        raise ValueError(f"boxes must lie inside the {height} x {width} image")
    # On the CPU one slice copy per window is several times faster than one gather over all of them
    # (benchmarks/precompute_throughput.py, part (d)); on a GPU it would be a kernel launch per window.
    crop = _slice_windows if images.device.type == "cpu" else _gather_windows
    return crop(images, safe, valid, size)


def _slice_windows(images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """``crop_patches`` by one slice copy per valid window (``boxes``: checked, long ``(B, k, 4)``)."""
    batch, channels = images.shape[:2]
    k = boxes.shape[1]
    if images.is_contiguous(memory_format=torch.channels_last):
        crops = images.new_zeros((batch, k, size, size, channels)).permute(0, 1, 4, 2, 3)
    else:
        crops = images.new_zeros((batch, k, channels, size, size))
    corners = boxes[..., :2].tolist()
    for b, j in valid.nonzero().tolist():
        x0, y0 = corners[b][j]
        crops[b, j] = images[b, :, y0 : y0 + size, x0 : x0 + size]
    return crops


def _gather_windows(images: torch.Tensor, boxes: torch.Tensor, valid: torch.Tensor, size: int) -> torch.Tensor:
    """``crop_patches`` by one gather over a strided view of every window: one kernel on any device."""
    windows = images.unfold(2, size, 1).unfold(3, size, 1)  # (B, C, H - size + 1, W - size + 1, size, size), a view
    b = torch.arange(images.shape[0], device=images.device)[:, None]
    boxes = boxes.to(images.device)
    crops = windows[b, :, boxes[..., 1], boxes[..., 0]]  # (B, k, C, size, size)
    if not valid.all():
        crops = crops.masked_fill(~valid.to(images.device)[..., None, None, None], 0)
    return crops
