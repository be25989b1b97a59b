"""Image decoding and the geometric preprocessing a model card names (resize, centre crop).

Normalisation is not here: every model in this package carries its own (``anchornet.layers.Normalize``)
and takes ``[0, 1]`` RGB tensors, so the same pixels can feed AnchorNet, the glance and the patch networks.
"""

from __future__ import annotations

import io
import threading
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageFile
from torchvision.transforms.v2 import functional as TF

__all__ = ["ImageDecodeError", "Preprocessing", "decode_image", "to_float"]

DEFAULT_MAX_PIXELS = 64_000_000
#: Longest side over the shortest that serving and the precompute job accept by default (``max_aspect_ratio``):
#: resizing the shorter side of a 96 x 666,000 image to 256 makes a 1.4 GB buffer. ``decode_image`` itself has
#: no limit unless asked.
DEFAULT_MAX_ASPECT_RATIO = 20.0


class ImageDecodeError(ValueError):
    """Bytes that are not a usable image; the message says why in one line."""


_PIL_SETTINGS = threading.Lock()


def decode_image(
    data: bytes, *, min_size: int = 1, max_pixels: int = DEFAULT_MAX_PIXELS, max_aspect_ratio: float | None = None
) -> Image.Image:
    """Decode ``data`` to an RGB PIL image, whatever its mode (grey, CMYK, palette, alpha, 16-bit grey).

    Transparent pixels are composited on white. 16-bit grey (PIL modes ``I;16*``: 16-bit PNGs and TIFFs, and
    ``I`` holding values in 0..65535) is scaled to 8 bits (value / 257, rounded). Raises ``ImageDecodeError`` for
    32-bit floating-point images (mode ``F``) and ``I`` images with values outside 0..65535, which have no
    scale to 8 bits that is right for every file, and for empty or non-image bytes, a truncated or otherwise
    corrupt file (whatever Pillow's format plugin raises on it), more than ``max_pixels`` pixels (a decompression
    bomb), a longer side more than
    ``max_aspect_ratio`` times the shorter (``None``: no limit; resizing the shorter side of a long thin image
    makes a buffer far larger than the image), both checked before decoding, or a side shorter than ``min_size``.
    """
    if not data:
        raise ImageDecodeError("empty image")
    try:
        # The warning filter and LOAD_TRUNCATED_IMAGES are process-wide and decode threads run this at once: change
        # them under one lock, and only around what needs them (the header, where Pillow checks for bombs)
        with _PIL_SETTINGS, warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise ImageDecodeError(f"image of {width} x {height} pixels exceeds the limit of {max_pixels} pixels")
        if max_aspect_ratio is not None and max(width, height) > max_aspect_ratio * min(width, height):
            raise ImageDecodeError(
                f"image of {width} x {height} pixels is too elongated: "
                f"its longer side may be at most {max_aspect_ratio:g} times its shorter side"
            )
        if ImageFile.LOAD_TRUNCATED_IMAGES:  # allowed process-wide by someone else; a truncated file is refused here
            with _PIL_SETTINGS:
                ImageFile.LOAD_TRUNCATED_IMAGES = False
                try:
                    image.load()
                finally:
                    ImageFile.LOAD_TRUNCATED_IMAGES = True
        else:
            image.load()
        if min(image.size) < min_size:
            raise ImageDecodeError(
                f"image of {image.size[0]} x {image.size[1]} pixels is too small: at least {min_size} x {min_size} "
                "needed"
            )
        return _to_rgb(image)
    except ImageDecodeError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageDecodeError(f"image exceeds the pixel limit: {err}") from err
    except Image.UnidentifiedImageError as err:
        raise ImageDecodeError("not an image (unrecognised format)") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ImageDecodeError(f"corrupt or truncated image: {err}") from err
    except Exception as err:  # Pillow's less common plugins raise their own types on bad bytes (DDS, BLP, SPIDER)
        detail = next(iter(str(err).splitlines()), "")
        raise ImageDecodeError(
            f"corrupt or unsupported image ({type(err).__name__}{': ' + detail if detail else ''})"
        ) from err


#: 16-bit grey in any byte order; ``convert("RGB")`` clips these (and ``I``) to 0..255 instead of scaling them.
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16B", "I;16L", "I;16N"})


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    if image.mode == "F":  # float TIFFs: [0, 1], [0, 255] or physical units; no one scale is right for all
        raise ImageDecodeError("unsupported image mode F (32-bit floating point): convert it to 8 or 16 bits")
    if image.mode == "I" or image.mode in _SIXTEEN_BIT_MODES:
        image = _sixteen_bit_to_grey(image)
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode != "RGBA" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _sixteen_bit_to_grey(image: Image.Image) -> Image.Image:
    """16-bit grey (``I;16*``, or ``I`` with values in 0..65535) to 8-bit ``L`` by value / 257, rounded (0 -> 0,
    65535 -> 255); ``LA`` when a ``transparency`` value marks transparent pixels (matched before scaling)."""
    pixels = np.asarray(image)  # uint16 in the mode's byte order, or int32 for I
    if image.mode == "I":
        low, high = int(pixels.min()), int(pixels.max())
        if low < 0 or high > 65535:
            raise ImageDecodeError(
                f"unsupported 32-bit integer image (mode I) with values {low}..{high}: "
                "only 0..65535 is scaled to 8 bits"
            )
    grey = Image.fromarray(((pixels.astype(np.uint32) + 128) // 257).astype(np.uint8))
    transparency = image.info.get("transparency")
    if isinstance(transparency, int):
        alpha = Image.fromarray(np.where(pixels == transparency, 0, 255).astype(np.uint8))
        return Image.merge("LA", (grey, alpha))
    return grey


@dataclass(frozen=True)
class Preprocessing:
    """Resize the shorter side to ``resize_size``, centre-crop ``image_size``; uint8 ``(3, S, S)`` out, contiguous
    and in its own storage (a view of the resized image would carry all of it wherever it is pickled to).

    ``resize_size == image_size`` is the "as is" mode for data that is already square at ``image_size``
    (resize and crop are then no-ops on such images).
    """

    image_size: int = 224
    resize_size: int = 256
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.resize_size < self.image_size:
            raise ValueError(f"need 1 <= image_size <= resize_size, got {self.image_size} and {self.resize_size}")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"unknown interpolation {self.interpolation!r}")

    @classmethod
    def as_is(cls, image_size: int = 224) -> Preprocessing:
        return cls(image_size=image_size, resize_size=image_size)

    def __call__(self, image: Image.Image, *, channels_last: bool = False) -> torch.Tensor:
        """``image`` preprocessed. ``channels_last``: the same values, with the memory laid out ``(S, S, 3)``,
        as the decoder wrote the pixels; a batch of them stacks to NHWC without a transposition, which is what
        channels-last convolutions, the JPEG encoder and ``crop_patches`` read fastest on the CPU."""
        mode = TF.InterpolationMode(self.interpolation)
        tensor = TF.pil_to_tensor(image)  # a (3, H, W) view of the decoder's (H, W, 3) pixels
        if tensor.shape[-2:] != (self.image_size, self.image_size) or self.resize_size != self.image_size:
            # on that view torch resizes channels-last: the same values as on a (3, H, W) copy (tested)
            tensor = TF.resize(tensor, [self.resize_size], interpolation=mode, antialias=True)
            tensor = TF.center_crop(tensor, [self.image_size, self.image_size])
        if channels_last:
            return tensor.permute(1, 2, 0).clone(memory_format=torch.contiguous_format).permute(2, 0, 1)
        return tensor.clone(memory_format=torch.contiguous_format)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        return cls(**{k: data[k] for k in ("image_size", "resize_size", "interpolation") if k in data})


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 ``[0, 255]`` images to float ``[0, 1]``; float input is returned unchanged."""
    return images.float().div_(255) if images.dtype == torch.uint8 else images
