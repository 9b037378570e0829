"""ovdense.images: one decode for every reader, as a viewer shows the picture (8-bit as Pillow, 16-bit scaled,
alpha over white, EXIF orientation, one pixel limit, one-line errors)."""

from __future__ import annotations

import io
import pickle
import struct
import subprocess
import sys
import warnings
import zlib

import cv2
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from ovdense import images
from ovdense.errors import InvalidArgumentError, OvdenseError
from ovdense.images import (
    DEFAULT_MAX_PIXELS,
    ImageDecodeError,
    ImageTooLargeError,
    as_rgb8_array,
    decode_image,
    get_max_pixels,
    set_max_pixels,
    to_rgb8,
)
from ovdense.regions import detection_input


@pytest.fixture(autouse=True)
def _default_limit(monkeypatch):
    monkeypatch.delenv("OVDENSE_MAX_PIXELS", raising=False)
    set_max_pixels(None)
    yield
    set_max_pixels(None)


# -- helpers: genuine PNGs of any bit depth, written by hand ----------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png(arr: np.ndarray, colour_type: int, depth: int, *chunks: bytes) -> bytes:
    """A PNG of ``arr`` (H x W or H x W x C, 8 or 16 bits, filter 0); ``chunks`` go between IHDR and IDAT."""
    h, w = arr.shape[:2]
    rows = arr.astype(">u2" if depth == 16 else np.uint8).reshape(h, -1)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", w, h, depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IDAT", zlib.compress(raw))


def png_end(data: bytes) -> bytes:
    return data + _chunk(b"IEND", b"")


def ihdr(data: bytes) -> tuple[int, int]:
    """(bit depth, colour type) of a PNG, from its IHDR."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return data[24], data[25]


def exif_chunk(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _chunk(b"eXIf", exif.tobytes()[6:])  # eXIf holds the TIFF data without the "Exif\0\0" prefix


def viewer16(v) -> np.ndarray:
    """round(v * 255 / 65535) in floating point: the reference for 16 -> 8 bits (no ties exist)."""
    return np.round(np.asarray(v, np.float64) * 255 / 65535).astype(np.uint8)


def over_white(c, a) -> np.ndarray:
    """round(c a / 255 + 255 (1 - a / 255)) in floating point (no ties exist)."""
    c, a = np.asarray(c, np.float64), np.asarray(a, np.float64)
    return np.round(c * a / 255 + 255 * (1 - a / 255)).astype(np.uint8)


def pil_rgb(path, exif=True) -> np.ndarray:
    """The decode of the old readers: Pillow's convert("RGB"), after exif_transpose when asked."""
    with Image.open(path) as im:
        return np.asarray((ImageOps.exif_transpose(im) if exif else im).convert("RGB"))


ALL16 = np.arange(65536, dtype=np.uint16).reshape(256, 256)


# -- 8-bit images: exactly Pillow's convert("RGB") ------------------------------------------------------------


def test_8bit_images_are_bit_identical_to_pillow_convert(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    im = Image.fromarray(rgb)
    exif = im.getexif()
    exif[0x0112] = 6
    im.save(tmp_path / "rot.jpg", exif=exif, quality=90)
    im.save(tmp_path / "plain.jpg", quality=75)
    Image.fromarray(rgb[..., 0]).save(tmp_path / "grey.jpg")
    im.save(tmp_path / "rgb.png")
    im.quantize(64).save(tmp_path / "palette.png")
    Image.fromarray(rgb[..., 1]).save(tmp_path / "grey.png")
    im.convert("1").save(tmp_path / "bw.png")
    with Image.open(tmp_path / "palette.png") as check:
        assert check.mode == "P" and "transparency" not in check.info
    for name in ("rot.jpg", "plain.jpg", "grey.jpg", "rgb.png", "palette.png", "grey.png", "bw.png"):
        for exif_on in (True, False):
            out = decode_image(tmp_path / name, exif=exif_on)
            np.testing.assert_array_equal(out, pil_rgb(tmp_path / name, exif_on), err_msg=name)
            assert out.dtype == np.uint8 and out.ndim == 3 and out.shape[2] == 3
            assert out.flags.c_contiguous and out.flags.writeable and out.flags.owndata
        # bytes decode the same
        np.testing.assert_array_equal(decode_image((tmp_path / name).read_bytes()), pil_rgb(tmp_path / name))
    assert decode_image(tmp_path / "rot.jpg").shape == (53, 37, 3)
    assert decode_image(tmp_path / "rot.jpg", exif=False).shape == (37, 53, 3)


@pytest.mark.parametrize("mode", ["CMYK", "YCbCr", "1", "L", "P", "RGB", "RGBX", "HSV"])
def test_other_8bit_modes_convert_as_pillow(mode):
    rng = np.random.default_rng(1)
    im = Image.fromarray(rng.integers(0, 256, (9, 11, 3), dtype=np.uint8)).convert(mode)
    np.testing.assert_array_equal(to_rgb8(im), np.asarray(im.convert("RGB")))
    np.testing.assert_array_equal(decode_image(im, exif=False), np.asarray(im.convert("RGB")))


# -- 16-bit greyscale -----------------------------------------------------------------------------------------


def test_grey16_png_is_scaled_not_clipped(tmp_path):
    cv2.imwrite(str(tmp_path / "g16.png"), ALL16)
    hand = png_end(png(ALL16, 0, 16))
    for data in ((tmp_path / "g16.png").read_bytes(), hand):
        assert ihdr(data) == (16, 0)  # a genuine 16-bit greyscale PNG
        with Image.open(io.BytesIO(data)) as im:
            assert im.mode in ("I;16", "I")  # I;16 from Pillow 11 on, I before
            old = np.asarray(im.convert("RGB"))
        out = decode_image(data)
        expected = viewer16(ALL16)
        np.testing.assert_array_equal(out, np.repeat(expected[..., None], 3, axis=2))
        np.testing.assert_array_equal(out[..., 0], (ALL16.astype(np.int64) + 128) // 257)
        # the old decode clipped: everything from 255 up was white
        assert (old[..., 0] == 255).mean() > 0.99 and (out[..., 0] == 255).sum() == 129


def test_grey16_modes_in_memory():
    v = np.array([[0, 128, 129, 385, 386], [32767, 32768, 65406, 65407, 65535]], np.uint16)
    expected = np.repeat(viewer16(v)[..., None], 3, axis=2)
    assert expected[0].tolist() == [[0] * 3, [0] * 3, [1] * 3, [1] * 3, [2] * 3]
    for mode in ("I;16", "I;16B", "I;16L"):
        dtype = ">u2" if mode == "I;16B" else "<u2"
        im = Image.frombuffer(mode, (5, 2), v.astype(dtype).tobytes(), "raw", mode, 0, 1)
        assert im.mode == mode
        np.testing.assert_array_equal(to_rgb8(im), expected, err_msg=mode)
    np.testing.assert_array_equal(to_rgb8(Image.fromarray(v.astype(np.int32))), expected)  # mode I


def test_grey16_pgm_opens_as_mode_i_and_is_scaled(tmp_path):
    cv2.imwrite(str(tmp_path / "g.pgm"), ALL16)
    with Image.open(tmp_path / "g.pgm") as im:
        assert im.mode == "I"
    np.testing.assert_array_equal(decode_image(tmp_path / "g.pgm")[..., 2], viewer16(ALL16))


def test_mode_i_out_of_range_and_float_are_refused(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"values -1\.\.70000 are outside 0\.\.65535"):
        to_rgb8(Image.fromarray(np.array([[-1, 70000]], np.int32)))
    Image.fromarray(np.array([[0.5, 2.0]], np.float32)).save(tmp_path / "f.tif")
    with pytest.raises(ImageDecodeError, match="float.*not supported") as err:
        decode_image(tmp_path / "f.tif")
    assert str(tmp_path / "f.tif") in str(err.value) and "\n" not in str(err.value)


def test_grey16_transparency_key_is_white():
    v = np.array([[0, 1000, 65535, 1000]], np.uint16)
    data = png_end(png(v, 0, 16, _chunk(b"tRNS", struct.pack(">H", 1000))))
    assert ihdr(data) == (16, 0)
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 255, 255, 255])
    v[0, 1] = 1001  # 1001 is not the key: its own grey (4); the last pixel still is
    data = png_end(png(v, 0, 16, _chunk(b"tRNS", struct.pack(">H", 1000))))
    np.testing.assert_array_equal(decode_image(data)[0, :, 0], [0, 4, 255, 255])


# -- 16-bit colour --------------------------------------------------------------------------------------------


def rgb16_values() -> np.ndarray:
    rng = np.random.default_rng(2)
    rgb = rng.integers(0, 65536, (24, 40, 3)).astype(np.uint16)
    # values where the high byte (v >> 8) and the viewer's rounding disagree, and the ends
    rgb[0, :8, 0] = [0, 128, 129, 255, 385, 386, 65407, 65535]
    return rgb


def test_rgb16_png_is_scaled_from_its_16_bit_values(tmp_path):
    rgb = rgb16_values()
    hand = png_end(png(rgb, 2, 16))
    cv2.imwrite(str(tmp_path / "c.png"), rgb[..., ::-1])
    for data in (hand, (tmp_path / "c.png").read_bytes()):
        assert ihdr(data) == (16, 2)  # 48-bit RGB
        with Image.open(io.BytesIO(data)) as im:
            # what Pillow does on its own: 8-bit RGB holding the high bytes
            assert im.mode == "RGB"
            np.testing.assert_array_equal(np.asarray(im.convert("RGB")), rgb >> 8)
        out = decode_image(data)
        np.testing.assert_array_equal(out, viewer16(rgb))
        assert out[0, :8, 0].tolist() == [0, 0, 1, 1, 1, 2, 255, 255]
        assert not np.array_equal(out, rgb >> 8)


def test_rgb16_tiff_and_open_pil_image(tmp_path):
    rgb = rgb16_values()
    cv2.imwrite(str(tmp_path / "c.tif"), rgb[..., ::-1])
    np.testing.assert_array_equal(decode_image(tmp_path / "c.tif"), viewer16(rgb))
    (tmp_path / "c.png").write_bytes(png_end(png(rgb, 2, 16)))
    with Image.open(tmp_path / "c.png") as im:  # an open, not yet loaded PIL image: its file is re-read
        np.testing.assert_array_equal(to_rgb8(im), viewer16(rgb))
        np.testing.assert_array_equal(decode_image(im), viewer16(rgb))  # reading the EXIF loads it
        # the caller's image still works; once loaded, Pillow holds only the high bytes, and those are converted
        np.testing.assert_array_equal(np.asarray(im), rgb >> 8)
        np.testing.assert_array_equal(to_rgb8(im), rgb >> 8)


def test_rgba16_and_la16_are_scaled_then_composited_over_white():
    rgb = rgb16_values()
    alpha = np.random.default_rng(3).integers(0, 65536, rgb.shape[:2]).astype(np.uint16)
    alpha[0, :3] = [0, 65535, 32896]
    data = png_end(png(np.dstack([rgb, alpha]), 6, 16))
    assert ihdr(data) == (16, 6)  # 64-bit RGBA
    out = decode_image(data)
    np.testing.assert_array_equal(out, over_white(viewer16(rgb), viewer16(alpha)[..., None]))
    assert out[0, 0].tolist() == [255, 255, 255]  # fully transparent: white
    np.testing.assert_array_equal(out[0, 1], viewer16(rgb[0, 1]))  # opaque: its colour
    grey = rgb[..., 1]
    data = png_end(png(np.dstack([grey, alpha]), 4, 16))
    assert ihdr(data) == (16, 4)  # 32-bit grey + alpha (Pillow opens it as 8-bit RGBA)
    expected = over_white(viewer16(grey), viewer16(alpha))
    np.testing.assert_array_equal(decode_image(data), np.repeat(expected[..., None], 3, axis=2))


def test_rgb16_transparency_key_uses_16_bit_values():
    rgb = np.array([[[1, 2, 3], [4, 5, 6], [1024, 1280, 1536]]], np.uint16)
    data = png_end(png(rgb, 2, 16, _chunk(b"tRNS", struct.pack(">HHH", 1024, 1280, 1536))))
    # the key is the third pixel (16-bit 1024,1280,1536 = 8-bit 4,5,6 by high byte); only it is white
    assert decode_image(data).tolist() == [[[0, 0, 0], [0, 0, 0], [255, 255, 255]]]


# -- transparency ---------------------------------------------------------------------------------------------


def all_colour_alpha() -> tuple[np.ndarray, np.ndarray]:
    """256 x 256: colour = column, alpha = row: every (c, a) pair."""
    c, a = np.meshgrid(np.arange(256), np.arange(256))
    return c.astype(np.uint8), a.astype(np.uint8)


def test_rgba_is_composited_over_white_exactly(tmp_path):
    c, a = all_colour_alpha()
    rgba = np.dstack([c, 255 - c, c // 2, a])
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out = decode_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out, over_white(rgba[..., :3], a[..., None]))
    np.testing.assert_array_equal(out[..., 0], (c.astype(int) * a + 255 * (255 - a.astype(int)) + 127) // 255)
    assert out[0].min() == 255 and np.array_equal(out[255], rgba[255, :, :3])  # a = 0: white; a = 255: itself
    assert not np.array_equal(out, pil_rgb(tmp_path / "a.png"))  # the old decode showed raw RGB under alpha 0
    np.testing.assert_array_equal(as_rgb8_array(rgba), out)


def test_la_pa_and_transparency_keys_are_composited(tmp_path):
    c, a = all_colour_alpha()
    Image.fromarray(np.dstack([c, a]), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "la.png")[..., 1], over_white(c, a))
    # palette with a tRNS alpha table
    p = Image.fromarray(np.array([[0, 1, 2, 3]], np.uint8), "P")
    p.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90, 100, 110, 120])
    p.save(tmp_path / "p.png", transparency=bytes([0, 128, 255, 255]))
    with Image.open(tmp_path / "p.png") as check:
        assert check.mode == "P" and "transparency" in check.info
    assert decode_image(tmp_path / "p.png").tolist() == [
        [[255, 255, 255], over_white([40, 50, 60], 128).tolist(), [70, 80, 90], [100, 110, 120]]
    ]
    # GIF: one transparent index
    p.save(tmp_path / "p.gif", transparency=1)
    assert decode_image(tmp_path / "p.gif")[0, 1].tolist() == [255, 255, 255]
    # L and RGB with a tRNS key colour
    grey = png_end(png(np.array([[0, 100, 200]]), 0, 8, _chunk(b"tRNS", struct.pack(">H", 100))))
    assert decode_image(grey)[0, :, 0].tolist() == [0, 255, 200]
    rgb = png_end(png(np.array([[[1, 2, 3], [4, 5, 6]]]), 2, 8, _chunk(b"tRNS", struct.pack(">HHH", 4, 5, 6))))
    assert decode_image(rgb).tolist() == [[[1, 2, 3], [255, 255, 255]]]
    # PA in memory
    rgba = p.convert("RGBA")
    np.testing.assert_array_equal(to_rgb8(p.convert("PA")), to_rgb8(rgba))
    np.testing.assert_array_equal(to_rgb8(rgba), over_white(np.asarray(rgba)[..., :3], np.asarray(rgba)[..., 3:]))


# -- EXIF orientation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_8_and_16_bit(tmp_path, orientation):
    rng = np.random.default_rng(orientation)
    v8 = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    im = Image.fromarray(v8)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(tmp_path / "o.png", exif=exif)
    expected = pil_rgb(tmp_path / "o.png")
    np.testing.assert_array_equal(decode_image(tmp_path / "o.png"), expected)
    assert expected.shape[:2] == ((7, 5) if orientation >= 5 else (5, 7))
    # the same picture as 16 bits (v * 257 scales back to v exactly), oriented from the same EXIF tag
    data = png_end(png(v8.astype(np.uint16) * 257, 2, 16, exif_chunk(orientation)))
    assert ihdr(data) == (16, 2)
    with Image.open(io.BytesIO(data)) as check:
        assert check.getexif()[0x0112] == orientation
    np.testing.assert_array_equal(decode_image(data), expected)
    np.testing.assert_array_equal(decode_image(data, exif=False), v8)


# -- the pixel limit ------------------------------------------------------------------------------------------


def declared_png(w: int, h: int) -> bytes:
    """A PNG declaring w x h 1-bit pixels with 8 bytes of data: cheap, and only a check before decoding passes."""
    ihdr_data = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr_data)
        + _chunk(b"IDAT", zlib.compress(b"\0" * 8))
        + _chunk(b"IEND", b"")
    )


def test_limit_default_env_and_setter(monkeypatch):
    assert DEFAULT_MAX_PIXELS == 89_478_485 == 1024**3 // 4 // 3
    assert get_max_pixels() == DEFAULT_MAX_PIXELS
    monkeypatch.setenv("OVDENSE_MAX_PIXELS", "1000")
    assert get_max_pixels() == 1000
    monkeypatch.setenv("OVDENSE_MAX_PIXELS", "0")
    assert get_max_pixels() == 0
    set_max_pixels(5)
    assert get_max_pixels() == 5  # the setter wins over the variable
    set_max_pixels(None)
    monkeypatch.setenv("OVDENSE_MAX_PIXELS", "lots")
    with pytest.raises(OvdenseError, match="OVDENSE_MAX_PIXELS='lots'.*0 = no limit"):
        get_max_pixels()
    monkeypatch.setenv("OVDENSE_MAX_PIXELS", "-3")
    with pytest.raises(OvdenseError, match="OVDENSE_MAX_PIXELS"):
        get_max_pixels()
    for bad in (-1, 2.5, "10", True):
        with pytest.raises(InvalidArgumentError, match="max_pixels"):
            set_max_pixels(bad)


def test_declared_size_over_the_default_limit_is_refused_before_decoding(tmp_path):
    path = tmp_path / "photo.png"
    path.write_bytes(declared_png(20000, 12000))
    with pytest.raises(Image.DecompressionBombError):  # what Pillow alone does (the old readers' traceback)
        Image.open(path)
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(path)
    assert str(err.value) == (
        f"image {path} is 20000 x 12000 = 240.0 MP, over the 89.5 MP limit; "
        "raise it with --max-pixels or OVDENSE_MAX_PIXELS (0 = no limit)"
    )
    with pytest.raises(ImageTooLargeError, match=r"^image shard/7\.png is 20000 x 12000"):
        decode_image(path.read_bytes(), what="shard/7.png")
    assert Image.MAX_IMAGE_PIXELS == DEFAULT_MAX_PIXELS  # Pillow's global is left as it was
    # within a raised limit, the (tiny, broken) data is what fails: nothing was decoded before the check
    set_max_pixels(0)
    with pytest.raises(ImageDecodeError, match="cannot read image .*photo.png") as err:
        decode_image(path)
    assert not isinstance(err.value, ImageTooLargeError)


def test_small_limit_counts_pixels_exactly(tmp_path, monkeypatch):
    Image.fromarray(np.zeros((50, 60, 3), np.uint8)).save(tmp_path / "x.png")
    set_max_pixels(2999)
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(tmp_path / "x.png")
    assert str(err.value).startswith(f"image {tmp_path / 'x.png'} is 60 x 50 = 3000 pixels, over the 2999 pixels")
    set_max_pixels(3000)
    assert decode_image(tmp_path / "x.png").shape == (50, 60, 3)
    set_max_pixels(None)
    monkeypatch.setenv("OVDENSE_MAX_PIXELS", "2999")
    with pytest.raises(ImageTooLargeError, match="2999 pixels limit"):
        decode_image(tmp_path / "x.png")


def test_pillow_bomb_warning_and_error_never_reach_the_user(tmp_path, monkeypatch):
    # Pillow's own limit lowered so small images cross it: 40 x 40 warns (> 1000), 50 x 50 raises (> 2000)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    rng = np.random.default_rng(4)
    for side in (40, 50):
        arr = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(arr).save(tmp_path / f"{side}.png")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            np.testing.assert_array_equal(decode_image(tmp_path / f"{side}.png"), arr)
            np.testing.assert_array_equal(decode_image((tmp_path / f"{side}.png").read_bytes()), arr)
        assert Image.MAX_IMAGE_PIXELS == 1000  # restored after the lifted re-open
    with pytest.warns(Image.DecompressionBombWarning):
        Image.open(tmp_path / "40.png").close()  # Pillow alone would have warned
    set_max_pixels(2000)  # ours still applies on the re-open path
    with pytest.raises(ImageTooLargeError, match="50 x 50 = 2500 pixels, over the 2000 pixels limit"):
        decode_image(tmp_path / "50.png")


# -- errors ---------------------------------------------------------------------------------------------------


def test_errors_are_one_line_and_name_the_image(tmp_path):
    with pytest.raises(ImageDecodeError, match=r"^image not found: .*nope\.jpg$"):
        decode_image(tmp_path / "nope.jpg")
    with pytest.raises(ImageDecodeError, match="not a file"):
        decode_image(tmp_path)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ImageDecodeError, match=r"^cannot read image .*notes\.txt: not a recognised image format$"):
        decode_image(tmp_path / "notes.txt")
    rng = np.random.default_rng(5)
    for fmt in ("JPEG", "PNG"):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format=fmt)
        cut = tmp_path / f"cut.{fmt.lower()}"
        cut.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
        with pytest.raises(ImageDecodeError) as err:
            decode_image(cut)
        msg = str(err.value)
        assert msg.startswith(f"cannot read image {cut}: ") and "\n" not in msg and err.value.reason in msg
    with pytest.raises(ImageDecodeError, match=r"^cannot read image: not a recognised image format$"):
        decode_image(b"\x00garbage")
    with pytest.raises(ImageDecodeError, match=r"^cannot read image a/b\.jpg: not a recognised"):
        decode_image(b"\x00garbage", what="a/b.jpg")
    with pytest.raises(InvalidArgumentError, match="expected a path, bytes or a PIL image, got int"):
        decode_image(3)
    assert issubclass(ImageTooLargeError, ImageDecodeError) and issubclass(ImageDecodeError, OvdenseError)
    set_max_pixels(1)
    with pytest.raises(ImageTooLargeError) as err:
        decode_image(tmp_path / "cut.png")
    again = pickle.loads(pickle.dumps(err.value))  # errors cross process boundaries whole
    assert type(again) is ImageTooLargeError and str(again) == str(err.value) and again.reason == err.value.reason
    assert err.value.reason.startswith("64 x 64 = 4096 pixels, over the 1 pixel limit")


# -- arrays ---------------------------------------------------------------------------------------------------


def test_arrays_follow_the_same_rules():
    rng = np.random.default_rng(6)
    rgb = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
    out = as_rgb8_array(rgb)
    np.testing.assert_array_equal(out, rgb)
    out[0, 0] = 7
    assert rgb[0, 0, 0] != 7 or rgb[0, 0, 1] != 7  # a copy, not the caller's array
    grey = rgb[..., 0]
    np.testing.assert_array_equal(as_rgb8_array(grey), np.repeat(grey[..., None], 3, axis=2))
    np.testing.assert_array_equal(as_rgb8_array(grey[..., None]), np.repeat(grey[..., None], 3, axis=2))
    strided = as_rgb8_array(rgb[:, ::-2])
    assert strided.flags.c_contiguous and np.array_equal(strided, rgb[:, ::-2])
    # uint16: scaled like 16-bit files (any byte order)
    v = ALL16
    np.testing.assert_array_equal(as_rgb8_array(v)[..., 1], viewer16(v))
    np.testing.assert_array_equal(as_rgb8_array(v.astype(">u2"))[..., 1], viewer16(v))
    # alpha over white, 8 and 16 bits; grey + alpha
    c, a = all_colour_alpha()
    np.testing.assert_array_equal(as_rgb8_array(np.dstack([c, c, c, a]))[..., 0], over_white(c, a))
    np.testing.assert_array_equal(as_rgb8_array(np.dstack([c, a]))[..., 2], over_white(c, a))
    c16, a16 = rng.integers(0, 65536, (2, 8, 9)).astype(np.uint16)
    np.testing.assert_array_equal(
        as_rgb8_array(np.dstack([c16, c16, c16, a16]))[..., 0], over_white(viewer16(c16), viewer16(a16))
    )
    # bool: 0 / 255, as Pillow's 1-bit images
    mask = np.array([[True, False]])
    assert as_rgb8_array(mask).tolist() == [[[255] * 3, [0] * 3]]
    assert as_rgb8_array(mask).tolist() == np.asarray(Image.fromarray(mask).convert("RGB")).tolist()


def test_arrays_refused_with_a_reason():
    with pytest.raises(InvalidArgumentError, match=r"float arrays are not supported \(got float32\)"):
        as_rgb8_array(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(InvalidArgumentError, match="uint8, uint16 or bool array, got int64"):
        as_rgb8_array(np.zeros((4, 4, 3), np.int64))
    with pytest.raises(InvalidArgumentError, match=r"got shape \(4, 4, 5\)"):
        as_rgb8_array(np.zeros((4, 4, 5), np.uint8))
    with pytest.raises(InvalidArgumentError, match=r"got shape \(4,\)"):
        as_rgb8_array(np.zeros(4, np.uint8))
    with pytest.raises(InvalidArgumentError, match="empty"):
        as_rgb8_array(np.zeros((0, 4, 3), np.uint8))


# -- callers --------------------------------------------------------------------------------------------------


def test_distill_dataset_decodes_16_bit_and_skips_over_limit(tmp_path):
    from ovdense.train.data import DistillDataset, ImageFolder

    rgb = rgb16_values()
    (tmp_path / "a_big.png").write_bytes(declared_png(20000, 12000))
    cv2.imwrite(str(tmp_path / "b16.png"), rgb[..., ::-1])
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    ds = DistillDataset(ImageFolder(tmp_path), student_size=64, crop_size=32, clip_mean=mean, clip_std=std)
    with pytest.warns(UserWarning) as record:
        out = ds[0]
    (msg,) = [str(w.message) for w in record]
    assert "a_big.png" in msg and "20000 x 12000 = 240.0 MP, over the 89.5 MP limit" in msg
    assert out["skipped"] == 1
    assert torch.equal(out["image"], detection_input(viewer16(rgb), 64, mean, std)[0][0])


def test_import_is_light():
    heavy = "('torch', 'cv2', 'timm', 'open_clip')"
    code = f"import sys, ovdense.images; print(sorted(m for m in {heavy} if m in sys.modules))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip() == "[]"
    assert images.__all__  # the module's public names are declared
