"""Decoding any image mode to RGB, rejecting bad bytes in one line, resize and centre crop."""

from __future__ import annotations

import io
import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from anchornet.preprocessing import ImageDecodeError, Preprocessing, decode_image, to_float


def _encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("mode", ["L", "RGB", "RGBA", "P", "CMYK", "LA", "I;16"])
def test_every_mode_decodes_to_rgb(mode: str) -> None:
    fmt = "JPEG" if mode == "CMYK" else "PNG"
    image = Image.new(mode, (120, 80))
    assert decode_image(_encode(image, fmt)).mode == "RGB"


#: 16-bit values and the 8-bit value each must become (value / 257, rounded): the ends, both sides of a rounding
#: boundary (128.5 * 257 = 33024.5) and values that ``convert("RGB")`` clipped to white
SIXTEEN_BIT = {0: 0, 128: 0, 129: 1, 1000: 4, 33024: 128, 33025: 129, 40000: 156, 65535: 255}


def _sixteen_bit_pixels() -> np.ndarray:
    return np.tile(np.array(list(SIXTEEN_BIT), dtype=np.uint16), (100, 12))  # 96 x 100


def _first_row(data: bytes) -> list[int]:
    image = decode_image(data)
    assert image.mode == "RGB"
    rgb = np.asarray(image)
    assert (rgb == rgb[..., :1]).all()  # grey
    return rgb[0, : len(SIXTEEN_BIT), 0].tolist()


@pytest.mark.parametrize("fmt", ["PNG", "TIFF"])
def test_sixteen_bit_grey_is_scaled_not_clipped(fmt: str) -> None:
    """A real 16-bit PNG or TIFF file: each value becomes value / 257, rounded (not clipped to 0 or 255)."""
    data = _encode(Image.fromarray(_sixteen_bit_pixels()), fmt)
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    assert _first_row(data) == list(SIXTEEN_BIT.values())


def test_big_endian_and_32_bit_integer_tiffs_holding_16_bit_values_are_scaled() -> None:
    pixels = _sixteen_bit_pixels()
    big_endian = _encode(Image.frombytes("I;16B", pixels.shape[::-1], pixels.astype(">u2").tobytes()), "TIFF")
    as_int32 = _encode(Image.fromarray(pixels.astype(np.int32)), "TIFF")
    for data, mode in ((big_endian, "I;16B"), (as_int32, "I")):
        assert Image.open(io.BytesIO(data)).mode == mode
        assert _first_row(data) == list(SIXTEEN_BIT.values())


def test_sixteen_bit_transparency_is_matched_before_scaling() -> None:
    """A 16-bit PNG's tRNS value marks only the pixels of exactly that value (1000, not 999 though both scale to 4)."""
    pixels = _sixteen_bit_pixels()
    pixels[0, :2] = (1000, 999)
    image = np.asarray(decode_image(_encode(Image.fromarray(pixels), "PNG", transparency=1000)))
    assert image[0, 0].tolist() == [255, 255, 255] and image[0, 1].tolist() == [4, 4, 4]


def test_float_and_wide_integer_images_are_refused_in_one_line() -> None:
    """No scale to 8 bits is right for every float TIFF, nor for integers beyond 16 bits: refused, saying why."""
    pixels = _sixteen_bit_pixels()
    cases = {
        r"unsupported image mode F \(32-bit floating point\)": Image.fromarray(pixels.astype(np.float32) / 65535),
        r"32-bit integer image \(mode I\) with values 0..131070": Image.fromarray(pixels.astype(np.int32) * 2),
        r"mode I\) with values -1..65535": Image.fromarray(np.where(pixels == 0, -1, pixels.astype(np.int32))),
    }
    for message, image in cases.items():
        with pytest.raises(ImageDecodeError, match=message) as err:
            decode_image(_encode(image, "TIFF"))
        assert "\n" not in str(err.value) and "exceeds" not in str(err.value)  # serving: 400, not 413


def test_serving_ingress_scales_sixteen_bit_and_refuses_float_with_400() -> None:
    """``decode_request`` (the Serve ingress): a 16-bit PNG is classified, a float TIFF is a 400 with the reason."""
    import asyncio

    from starlette.requests import Request

    from pipelines.serve import decode_request
    from pipelines.serve_http import ApiError

    spec = {
        "max_body_bytes": 1 << 20,
        "preprocessing": Preprocessing().to_dict(),
        "min_side": 95,
        "max_pixels": 1 << 24,
        "max_aspect_ratio": 20.0,
    }

    def request(data: bytes) -> Request:
        async def receive() -> dict[str, object]:
            return {"type": "http.request", "body": data, "more_body": False}

        headers = [(b"content-type", b"application/octet-stream"), (b"content-length", str(len(data)).encode())]
        return Request({"type": "http", "method": "POST", "path": "/classify", "headers": headers}, receive)

    pixels = np.full((120, 100), 40000, dtype=np.uint16)
    image, size, _ = asyncio.run(decode_request(request(_encode(Image.fromarray(pixels))), spec))
    assert size == [100, 120] and image.shape == (3, 224, 224) and set(image.unique().tolist()) == {156}
    with pytest.raises(ApiError) as err:
        asyncio.run(decode_request(request(_encode(Image.fromarray(pixels.astype(np.float32)), "TIFF")), spec))
    assert (err.value.status, err.value.code) == (400, "bad_image") and "mode F" in err.value.message


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


def test_what_less_common_format_plugins_raise_is_a_decode_error() -> None:
    """Pillow opens any format it has a plugin for, and some plugins raise their own types on bad bytes; a server
    must still answer 400 (found by fuzzing: DDS raised NotImplementedError, BLP BLPFormatError)."""
    dds = b"DDS " + struct.pack("<7I", 124, 0x1007, 200, 200, 0, 0, 0) + b"\0" * 100
    blp = io.BytesIO()
    Image.new("RGB", (100, 100), (1, 2, 3)).convert("P").save(blp, "BLP")
    bad_blp = bytearray(blp.getvalue())
    bad_blp[4:8] = (6684673).to_bytes(4, "little")  # an unknown compression
    for data, kind in ((dds, "NotImplementedError"), (bytes(bad_blp), "BLPFormatError")):
        with pytest.raises(ImageDecodeError, match=rf"^corrupt or unsupported image \({kind}") as err:
            decode_image(data)
        assert "\n" not in str(err.value)


def test_decoding_threads_leave_pillows_process_settings_as_they_were(monkeypatch: pytest.MonkeyPatch) -> None:
    """The precompute job and the server decode on several threads at once; the warning filter and
    ``LOAD_TRUNCATED_IMAGES`` that ``decode_image`` changes are process-wide."""
    from concurrent.futures import ThreadPoolExecutor

    from PIL import ImageFile

    good = _encode(Image.new("RGB", (300, 300), (10, 200, 30)), "JPEG")
    truncated = good[: len(good) // 2]
    filters = list(warnings.filters)

    def decode(data: bytes) -> str:
        try:
            return str(decode_image(data).size)
        except ImageDecodeError as err:
            return str(err)

    for allow_truncated in (False, True):  # True: someone allowed truncated files for the whole process
        monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", allow_truncated)
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(decode, [good, truncated] * 100))
        assert results[0::2] == ["(300, 300)"] * 100
        assert all("truncated" in r for r in results[1::2])
        assert ImageFile.LOAD_TRUNCATED_IMAGES is allow_truncated
        assert warnings.filters == filters


def _png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width x height`` pixels (decoding it would fail: the data is 8 x 8)."""
    png = bytearray(_encode(Image.new("L", (8, 8))))
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    png[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    png[ihdr + 13 : ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(png[ihdr - 4 : ihdr + 13])))
    return bytes(png)


def test_aspect_ratio_limit_is_opt_in_and_checked_before_decoding() -> None:
    """Long thin images cost time and memory out of proportion to their pixels once the shorter side is resized;
    serving refuses them from the header. Off by default (the precompute job decodes what it always did)."""
    long_thin = _encode(Image.new("RGB", (95, 2000)))
    assert decode_image(long_thin, min_size=95).size == (95, 2000)
    assert decode_image(long_thin, max_aspect_ratio=25).size == (95, 2000)
    for data in (long_thin, _encode(Image.new("RGB", (2000, 95)))):
        with pytest.raises(ImageDecodeError, match="too elongated: its longer side may be at most 20 times"):
            decode_image(data, max_aspect_ratio=20)
    with pytest.raises(ImageDecodeError, match="too elongated"):  # from the header alone: the pixels are not there
        decode_image(_png_claiming(95, 420_000), max_pixels=40_000_000, max_aspect_ratio=20)
    with pytest.raises(ImageDecodeError, match="truncated"):
        decode_image(_png_claiming(95, 420_000), max_pixels=40_000_000)


@pytest.mark.parametrize(
    ("size", "preprocessing"),
    [((95, 4000), Preprocessing()), ((224, 3000), Preprocessing.as_is(224)), ((224, 224), Preprocessing.as_is(224))],
)
def test_output_owns_its_storage(size: tuple[int, int], preprocessing: Preprocessing) -> None:
    """The crop is its own contiguous tensor, not a view of the resized image: pickled (to a Ray actor), a view
    carries all of its storage (82 MB for a 95 x 40000 image)."""
    out = preprocessing(Image.new("RGB", size))
    assert out.shape == (3, 224, 224) and out.is_contiguous()
    assert out.untyped_storage().nbytes() == out.numel()


@pytest.mark.parametrize("interpolation", ["bilinear", "bicubic", "nearest"])
@pytest.mark.parametrize("size", [(500, 375), (160, 240), (1000, 90), (224, 224)])
def test_channels_last_output_has_the_same_values(size: tuple[int, int], interpolation: str) -> None:
    """``channels_last=True`` (the precompute job's decoder) only lays the memory out (S, S, 3): the values are
    the bits of the default (3, S, S) output, through the resize and centre crop or as is."""
    pixels = torch.randint(0, 256, (size[1], size[0], 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    image = Image.fromarray(pixels.numpy())
    for preprocessing in (Preprocessing(interpolation=interpolation), Preprocessing.as_is(224)):
        default, hwc = preprocessing(image), preprocessing(image, channels_last=True)
        assert torch.equal(default, hwc) and default.is_contiguous()
        assert hwc.permute(1, 2, 0).is_contiguous() and hwc.untyped_storage().nbytes() == hwc.numel()


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
