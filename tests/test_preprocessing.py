"""Decoding any image mode to RGB, rejecting bad bytes in one line, resize and centre crop."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from anchornet.preprocessing import ImageDecodeError, Preprocessing, decode_image, to_float


def _encode(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_every_mode_decodes_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new(mode, (120, 80))
    assert decode_image(_encode(image, fmt)).mode == "RGB"


def test_transparency_is_composited_on_white() -> None:
    image = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    assert decode_image(_encode(image)).getpixel((5, 5)) == (255, 255, 255)


def test_bad_bytes_raise_one_line_errors() -> None:
    jpeg = _encode(Image.new("RGB", (300, 300), (10, 200, 30)), "JPEG")
    with pytest.raises(ImageDecodeError, match="empty"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not an image"):
        decode_image(b"certainly not an image")
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(jpeg[: len(jpeg) // 2])
    with pytest.raises(ImageDecodeError, match="exceeds the limit"):
        decode_image(_encode(Image.new("L", (2000, 2000))), max_pixels=1_000_000)
    with pytest.raises(ImageDecodeError, match="too small: at least 95 x 95"):
        decode_image(_encode(Image.new("RGB", (200, 60))), min_size=95)


def test_resize_and_centre_crop() -> None:
    image = Image.new("RGB", (400, 300))
    out = Preprocessing(image_size=224, resize_size=256)(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8


def test_as_is_keeps_square_images_untouched() -> None:
    pixels = torch.randint(0, 256, (224, 224, 3), dtype=torch.uint8)
    image = Image.fromarray(pixels.numpy())
    assert torch.equal(Preprocessing.as_is(224)(image), pixels.permute(2, 0, 1))
    assert Preprocessing.from_dict(Preprocessing.as_is(160).to_dict()) == Preprocessing.as_is(160)


def test_to_float() -> None:
    assert to_float(torch.full((1, 3, 2, 2), 255, dtype=torch.uint8)).max() == 1.0
    with pytest.raises(ValueError, match="image_size"):
        Preprocessing(image_size=256, resize_size=224)
