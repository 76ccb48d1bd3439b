"""Decoding uploads: formats, modes, orientation, limits, and hostile bytes. Every input is made here."""

from __future__ import annotations

import io
import random
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
from PIL import (
    EpsImagePlugin,
    GifImagePlugin,
    IcoImagePlugin,
    Image,
    ImageDraw,
    ImageFile,
    ImageOps,
    PcxImagePlugin,
    PpmImagePlugin,
    TgaImagePlugin,
)
from transformers.image_transforms import convert_to_rgb

from embeddings.errors import ApiError, ImageTooLarge, InvalidImage, TooLarge, UnsupportedImage
from embeddings.images import MAX_PNG_CHUNKS, SUPPORTED_FORMATS, DecodedImage, _to_rgb, decode_image
from tests.conftest import gradient_image, image_bytes

# --- helpers -------------------------------------------------------------------------------------


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def transformers_rgb(data: bytes) -> np.ndarray:
    """What transformers' pipeline makes of the same file: Pillow's open, then convert_to_rgb."""
    return convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)


def png_chunk(chunk_type: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + chunk_type + payload + struct.pack(">I", zlib.crc32(chunk_type + payload))


def handmade_png(width: int, height: int, *, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    """A PNG written chunk by chunk, for what Pillow will not save (16-bit RGB, lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", zlib.compress(raw))
        + png_chunk(b"IEND", b"")
    )


def png_rows(samples: np.ndarray) -> bytes:
    """Scanlines with filter type 0 (none) before each row, as IDAT wants them."""
    return b"".join(b"\x00" + row.tobytes() for row in samples)


def rgba_picture(width: int = 48, height: int = 32) -> Image.Image:
    """Colour gradients with an alpha ramp from transparent to opaque, so compositing shows."""
    rgb = np.asarray(gradient_image(width, height))
    alpha = np.tile(np.linspace(0, 255, width).astype(np.uint8), (height, 1))
    return Image.fromarray(np.dstack([rgb, alpha]), "RGBA")


def orientation_exif(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def error_from(data: bytes, **kwargs) -> ApiError:
    with pytest.raises(ApiError) as caught:
        decode_image(data, **kwargs)
    return caught.value


# --- formats -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "save_args", "lossless"),
    [
        ("JPEG", {"quality": 95}, False),
        ("PNG", {}, True),
        ("WEBP", {"lossless": True}, True),
        ("WEBP", {"quality": 90}, False),
        ("GIF", {}, False),  # palette quantisation
        ("BMP", {}, True),
        ("TIFF", {}, True),
        ("TIFF", {"compression": "tiff_lzw"}, True),
    ],
)
def test_supported_formats_decode_to_rgb_of_their_size(fmt, save_args, lossless):
    picture = gradient_image(64, 40)
    data = image_bytes(picture, fmt, **save_args)
    decoded = decode_image(data)
    assert isinstance(decoded, DecodedImage)
    assert decoded.format == fmt
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == decoded.original_size == (64, 40)
    error = np.abs(pixels(decoded.image) - pixels(picture))
    if lossless:
        assert error.max() == 0
    else:
        assert error.mean() < 12


def test_decoded_image_is_loaded_and_independent_of_the_bytes():
    decoded = decode_image(image_bytes(gradient_image(16, 8), "PNG"))
    # Would raise on a closed or lazy image file; copy() works on a plain, loaded image.
    assert decoded.image.copy().getpixel((0, 0)) == decoded.image.getpixel((0, 0))
    assert decoded.image.info == {}
    assert not isinstance(decoded.image, ImageFile.ImageFile)


def test_supported_formats_are_the_documented_ones():
    assert SUPPORTED_FORMATS == {"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"}


def frames(*colours: str, size=(24, 16)) -> list[Image.Image]:
    return [Image.new("RGB", size, colour) for colour in colours]


@pytest.mark.parametrize(
    ("fmt", "save_args"),
    [
        ("GIF", {"duration": 100, "loop": 0}),
        ("WEBP", {"duration": 100, "lossless": True}),
        ("PNG", {"duration": 100}),  # APNG
        ("TIFF", {}),  # multi-page
        ("MPO", {}),
    ],
)
def test_animated_and_multi_frame_images_decode_their_first_frame(fmt, save_args):
    first, *rest = frames("red", "blue", "lime")
    data = image_bytes(first, fmt, save_all=True, append_images=rest, **save_args)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == 3  # the file really is animated
    decoded = decode_image(data)
    assert decoded.format == fmt
    assert decoded.image.size == (24, 16)
    red = np.array([255, 0, 0])
    assert np.abs(pixels(decoded.image) - red).max() <= 3  # MPO frames are JPEG


def gif_frame_ends(data: bytes) -> list[int]:
    """The offset just past each frame's image data, walking the GIF's blocks."""
    pos, ends = 13, []
    if data[10] & 0x80:  # global colour table
        pos += 3 << ((data[10] & 0x07) + 1)
    while data[pos] != 0x3B:  # trailer
        image = data[pos] == 0x2C
        if image:  # image descriptor, optional local colour table, LZW minimum code size
            flags = data[pos + 9]
            pos += 10 + (3 << ((flags & 0x07) + 1) if flags & 0x80 else 0) + 1
        else:  # extension: introducer and label
            pos += 2
        while data[pos]:  # data sub-blocks up to their terminator
            pos += data[pos] + 1
        pos += 1
        if image:
            ends.append(pos)
    return ends


def test_a_200_frame_gif_decodes_frame_0_and_never_reads_the_later_frames(monkeypatch):
    colours = [(i, 255 - i, (7 * i) % 256) for i in range(200)]
    first, *rest = frames(*colours)
    data = image_bytes(first, "GIF", save_all=True, append_images=rest, duration=40, loop=0)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.n_frames == 200
    seeks = []

    def recording(original):
        def seek(self, frame, *args, **kwargs):
            seeks.append(frame)
            return original(self, frame, *args, **kwargs)

        return seek

    for name in ("seek", "_seek"):
        monkeypatch.setattr(GifImagePlugin.GifImageFile, name, recording(getattr(GifImagePlugin.GifImageFile, name)))
    decoded = decode_image(data)
    assert pixels(decoded.image).reshape(-1, 3).tolist() == [list(colours[0])] * (24 * 16)
    assert set(seeks) == {0}
    # Cut after frame 0, without even a trailer: nothing past frame 0 is needed.
    truncated = data[: gif_frame_ends(data)[0]]
    assert len(truncated) < len(data) // 50
    assert np.array_equal(pixels(decode_image(truncated).image), pixels(decoded.image))


# --- modes ---------------------------------------------------------------------------------------


def test_rgba_png_is_composited_on_white_exactly_like_transformers():
    data = image_bytes(rgba_picture(), "PNG")
    got = np.asarray(decode_image(data).image)
    assert np.array_equal(got, transformers_rgb(data))
    assert (got[:, 0] == 255).all()  # fully transparent column: white, not black


def test_rgba_webp_is_composited_like_transformers():
    data = image_bytes(rgba_picture(), "WEBP", lossless=True)
    assert np.array_equal(np.asarray(decode_image(data).image), transformers_rgb(data))


def test_la_png_is_composited_like_transformers():
    data = image_bytes(rgba_picture().convert("LA"), "PNG")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "LA"
    assert np.array_equal(np.asarray(decode_image(data).image), transformers_rgb(data))


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency_is_composited_like_transformers(fmt):
    picture = gradient_image(32, 32).quantize(16)
    index = picture.getpixel((0, 0))
    data = image_bytes(picture, fmt, transparency=index)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "P" and "transparency" in opened.info
    got = np.asarray(decode_image(data).image)
    assert np.array_equal(got, transformers_rgb(data))
    assert tuple(got[0, 0]) == (255, 255, 255)


def test_rgb_png_with_transparent_colour_is_composited_like_transformers():
    picture = gradient_image(32, 16)
    data = image_bytes(picture, "PNG", transparency=picture.getpixel((0, 0)))
    got = np.asarray(decode_image(data).image)
    assert np.array_equal(got, transformers_rgb(data))
    assert tuple(got[0, 0]) == (255, 255, 255)


def _transparent_files() -> dict[str, bytes]:
    palette = gradient_image(45, 31).quantize(16)
    rgb = gradient_image(45, 31)
    return {
        "rgba-png": image_bytes(rgba_picture(45, 31), "PNG"),
        "la-png": image_bytes(rgba_picture(45, 31).convert("LA"), "PNG"),
        "palette-png": image_bytes(palette, "PNG", transparency=palette.getpixel((0, 0))),
        "palette-gif": image_bytes(palette, "GIF", transparency=palette.getpixel((0, 0))),
        "rgb-png-transparent-colour": image_bytes(rgb, "PNG", transparency=rgb.getpixel((0, 0))),
    }


@pytest.mark.parametrize("name", sorted(_transparent_files()))
@pytest.mark.parametrize("band_pixels", [45, 100, 45 * 31 - 1])  # one row, rows and a remainder, two bands
def test_transparency_is_composited_band_by_band_to_transformers_bytes(monkeypatch, name, band_pixels):
    from embeddings import images

    monkeypatch.setattr(images, "COMPOSITE_BAND_PIXELS", band_pixels)
    data = _transparent_files()[name]
    assert np.array_equal(np.asarray(decode_image(data).image), transformers_rgb(data))


_DECODE_PEAK = """
import io
from PIL import Image
from embeddings.images import decode_image

def status(field):
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith(field))

side = 4000
im = Image.new("P", (side, side)); im.putpalette([i % 256 for i in range(768)])
buffer = io.BytesIO(); im.save(buffer, "PNG", transparency=0); data = buffer.getvalue(); del im
with open("/proc/self/clear_refs", "w") as handle:
    handle.write("5")  # the peak (VmHWM) starts again from here
before = status("VmRSS:")
decoded = decode_image(data, max_pixels=side * side)
print((status("VmHWM:") - before) * 1024 / side / side)
"""


def test_a_small_palette_png_with_transparency_decodes_in_a_few_bytes_a_pixel():
    # The 6 kB file that decodes to 16 megapixels: transformers' recipe peaks near 17 bytes a pixel
    # (three full-size RGBA copies); band by band it is the source, the RGB out and a band.
    import subprocess
    import sys

    peak = float(
        subprocess.run([sys.executable, "-c", _DECODE_PEAK], capture_output=True, text=True, check=True).stdout
    )
    assert peak < 8, f"{peak:.1f} bytes a pixel"


@pytest.mark.parametrize("fmt", ["JPEG", "TIFF"])
def test_cmyk_becomes_rgb_like_transformers(fmt):
    data = image_bytes(gradient_image(40, 30).convert("CMYK"), fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "CMYK"
    decoded = decode_image(data)
    assert decoded.image.mode == "RGB"
    assert np.array_equal(np.asarray(decoded.image), transformers_rgb(data))


@pytest.mark.parametrize(("mode", "fmt"), [("L", "PNG"), ("L", "JPEG"), ("1", "PNG"), ("1", "BMP"), ("P", "BMP")])
def test_greyscale_bilevel_and_palette_become_rgb_like_transformers(mode, fmt):
    data = image_bytes(gradient_image(40, 30).convert(mode), fmt)
    got = np.asarray(decode_image(data).image)
    assert got.shape == (30, 40, 3)
    assert np.array_equal(got, transformers_rgb(data))
    if mode in ("L", "1"):
        assert (got[..., 0] == got[..., 1]).all() and (got[..., 1] == got[..., 2]).all()


def test_lab_tiff_becomes_rgb_like_transformers():
    data = image_bytes(Image.new("LAB", (8, 8), (128, 128, 128)), "TIFF")
    got = np.asarray(decode_image(data).image)
    assert np.array_equal(got, transformers_rgb(data))
    assert tuple(got[0, 0]) == (119, 119, 119)  # L*=50 grey, really converted, not copied


def grey_ramp() -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (4, 1))


@pytest.mark.parametrize(("fmt", "mode"), [("PNG", "I;16"), ("TIFF", "I;16"), ("TIFF", "I;16B")])
def test_sixteen_bit_greyscale_equals_its_eight_bit_twin(fmt, mode):
    eight = grey_ramp()
    byte_order = ">" if mode == "I;16B" else "<"
    data = image_bytes(Image.fromarray((eight.astype(np.uint16) * 257).astype(f"{byte_order}u2")), fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == mode
    got = np.asarray(decode_image(data).image)
    twin = np.asarray(decode_image(image_bytes(Image.fromarray(eight), fmt)).image)
    assert np.array_equal(got, twin)
    assert np.array_equal(got, np.dstack([eight] * 3))


def test_signed_sixteen_bit_tiff_opened_as_mode_i_is_scaled_by_value():
    values = np.array([[-300, 0, 128, 129, 32767]], dtype=np.int16)
    data = image_bytes(Image.fromarray(values.view(np.uint16)), "TIFF", tiffinfo={339: 2})
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "I"  # Pillow's reading of SampleFormat=2, 16 bits
    got = np.asarray(decode_image(data).image)[..., 0]
    assert got.tolist() == [[0, 0, 0, 1, 127]]  # negatives clip to black; the rest v / 257, rounded


def test_sixteen_bit_greyscale_is_scaled_by_value_with_rounding_not_clipped():
    values = np.array([[0, 128, 129, 257, 385, 386, 32896, 65278, 65406, 65407, 65535]], dtype=np.uint16)
    got = np.asarray(decode_image(image_bytes(Image.fromarray(values), "PNG")).image)[..., 0]
    assert got.tolist() == [[0, 0, 1, 1, 1, 2, 128, 254, 254, 255, 255]]  # 65406 / 257 = 254.498
    assert np.array_equal(got, np.round(values / 257).astype(np.uint8))


def test_sixteen_bit_greyscale_transparent_value_becomes_white():
    values = np.array([[0, 257 * 5], [257 * 9, 257 * 5]], dtype=np.uint16)
    data = image_bytes(Image.fromarray(values), "PNG", transparency=257 * 5)
    got = np.asarray(decode_image(data).image)[..., 0]
    assert got.tolist() == [[0, 255], [9, 255]]


def test_sixteen_bit_rgb_png_equals_its_eight_bit_twin():
    eight = np.asarray(gradient_image(40, 24))
    sixteen = (eight.astype(np.uint16) * 257).astype(">u2")  # PNG samples are big-endian
    data16 = handmade_png(40, 24, bit_depth=16, color_type=2, raw=png_rows(sixteen.reshape(24, -1)))
    data8 = handmade_png(40, 24, bit_depth=8, color_type=2, raw=png_rows(eight.reshape(24, -1)))
    got = np.asarray(decode_image(data16).image)
    assert np.array_equal(got, eight)
    assert np.array_equal(got, np.asarray(decode_image(data8).image))


def test_sixteen_bit_rgba_png_equals_its_eight_bit_twin():
    eight = np.asarray(rgba_picture(40, 24))
    sixteen = (eight.astype(np.uint16) * 257).astype(">u2")  # PNG samples are big-endian
    data16 = handmade_png(40, 24, bit_depth=16, color_type=6, raw=png_rows(sixteen.reshape(24, -1)))
    data8 = image_bytes(Image.fromarray(eight, "RGBA"), "PNG")
    assert np.array_equal(np.asarray(decode_image(data16).image), np.asarray(decode_image(data8).image))


def test_float_tiff_is_clipped_to_eight_bits():
    values = np.array([[-10.0, 0.2, 100.4, 254.7, 300.0, np.nan]], dtype=np.float32)
    got = np.asarray(decode_image(image_bytes(Image.fromarray(values, "F"), "TIFF")).image)[..., 0]
    assert got.tolist() == [[0, 0, 100, 255, 255, 0]]


def test_thirty_two_bit_integer_tiff_is_clipped_to_eight_bits():
    values = np.array([[-5, 7, 255, 70000]], dtype=np.int32)
    data = image_bytes(Image.fromarray(values, "I"), "TIFF")
    got = np.asarray(decode_image(data).image)[..., 0]
    assert got.tolist() == [[0, 7, 255, 255]]


@pytest.mark.parametrize("mode", ["RGBa", "La"])
def test_premultiplied_alpha_is_composited_on_white(mode):
    # No file format opens in these modes in Pillow 11 (TIFF unpremultiplies while reading), so the
    # conversion step is checked on its own: premultiplied c over white is c + (255 - a).
    colour, alpha = 40, 100
    picture = Image.new("RGBa", (2, 2), (colour, colour, colour, alpha))
    if mode == "La":
        picture = Image.merge("La", (picture.getchannel(0), picture.getchannel(3)))
    got = np.asarray(_to_rgb(picture))
    assert np.abs(got.astype(int) - (colour + 255 - alpha)).max() <= 1


# --- orientation ---------------------------------------------------------------------------------

# What a viewer does to the stored pixels for each EXIF orientation (PIL's rotate is anticlockwise).
UPRIGHT = {
    3: lambda im: im.rotate(180),
    6: lambda im: im.rotate(-90, expand=True),
    8: lambda im: im.rotate(90, expand=True),
}


@pytest.mark.parametrize(
    ("fmt", "save_args"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("TIFF", {}), ("TIFF", {"compression": "tiff_lzw"})],
)
@pytest.mark.parametrize("orientation", sorted(UPRIGHT))
def test_exif_orientation_gives_the_upright_picture(orientation, fmt, save_args):
    # Pillow's TIFF reader turns the picture itself while loading; it must not be turned twice.
    stored = gradient_image(48, 32)
    data = image_bytes(stored, fmt, exif=orientation_exif(orientation), **save_args)
    decoded = decode_image(data)
    assert decoded.original_size == (48, 32)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(UPRIGHT[orientation](stored)))


def test_phone_jpeg_with_orientation_six_is_upright():
    stored = gradient_image(64, 48)
    data = image_bytes(stored, "JPEG", quality=95, exif=orientation_exif(6))
    decoded = decode_image(data)
    assert decoded.image.size == (48, 64)
    as_stored = Image.open(io.BytesIO(data)).convert("RGB")  # Pillow alone ignores the tag
    assert np.array_equal(np.asarray(decoded.image), np.asarray(UPRIGHT[6](as_stored)))


BROKEN_EXIF = {
    "bad-tiff-header": b"Exif\x00\x00MM\x00\xbc\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x06",
    "ifd-out-of-range": b"Exif\x00\x00II*\x00\xff\xff\xff\x7f",
    "cut-in-entry": b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12",
}


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
@pytest.mark.parametrize("exif", BROKEN_EXIF.values(), ids=BROKEN_EXIF.keys())
def test_malformed_exif_falls_back_to_stored_orientation(exif, fmt):
    stored = gradient_image(32, 24)
    data = image_bytes(stored, fmt, exif=exif)
    decoded = decode_image(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow says "Corrupt EXIF data", and copes
        as_stored = Image.open(io.BytesIO(data)).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(as_stored))


def test_exif_that_makes_pillow_raise_is_ignored():
    data = image_bytes(gradient_image(32, 24), "PNG", exif=BROKEN_EXIF["bad-tiff-header"])
    with pytest.raises(SyntaxError):
        ImageOps.exif_transpose(Image.open(io.BytesIO(data)))  # what decode_image must survive
    assert decode_image(data).image.size == (32, 24)


# --- invalid bytes -------------------------------------------------------------------------------


def assert_invalid(data: bytes) -> InvalidImage:
    error = error_from(data, key="photo")
    assert type(error) is InvalidImage
    assert error.status_code == 400 and error.code == "invalid_image" and error.key == "photo"
    return error


def test_text_renamed_to_jpg_is_invalid_image():
    assert_invalid(b"Dear reviewer, this is a plain text file that someone named holiday.jpg\n" * 4)


def test_empty_bytes_are_invalid_image():
    assert_invalid(b"")


def test_random_bytes_are_invalid_image():
    assert_invalid(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())


def test_truncated_jpeg_is_invalid_image():
    data = image_bytes(gradient_image(200, 150), "JPEG", quality=90)
    assert_invalid(data[: len(data) // 2])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_is_invalid_image():
    data = image_bytes(gradient_image(64, 64), "PNG")
    assert_invalid(data[: len(data) - 40])
    assert_invalid(data[:-12])  # only IEND missing


def idat_span(data: bytes) -> tuple[int, int]:
    """Offsets of the first IDAT chunk's payload."""
    start = data.index(b"IDAT") + 4
    (length,) = struct.unpack(">I", data[start - 8 : start - 4])
    return start, start + length


def flip(data: bytes, offset: int) -> bytes:
    out = bytearray(data)
    out[offset] ^= 0x01
    return bytes(out)


def test_png_with_flipped_byte_inside_idat_is_invalid_image():
    data = image_bytes(gradient_image(64, 64), "PNG")
    start, end = idat_span(data)
    assert_invalid(flip(data, (start + end) // 2))


def test_png_whose_idat_crc_alone_is_wrong_is_invalid_image_though_pillow_accepts_it():
    data = image_bytes(gradient_image(64, 64), "PNG")
    _, end = idat_span(data)
    corrupt = flip(data, end)  # first byte of the IDAT chunk's CRC
    with Image.open(io.BytesIO(corrupt)) as opened:
        opened.load()  # Pillow does not check IDAT CRCs: this is why images.py does
    assert_invalid(corrupt)


def test_png_with_broken_chunk_structure_is_invalid_image():
    data = image_bytes(gradient_image(16, 16), "PNG")
    start, _ = idat_span(data)
    lying_length = data[: start - 8] + struct.pack(">I", 10**6) + data[start - 4 :]
    assert_invalid(lying_length)
    bad_type = data[: start - 4] + b"ID@T" + data[start:]
    assert_invalid(bad_type)


def test_png_with_bytes_after_iend_still_decodes():
    data = image_bytes(gradient_image(16, 16), "PNG") + b"trailing junk"
    assert decode_image(data).image.size == (16, 16)


def png_with_chunks(count: int, *, before_idat: bool = True) -> bytes:
    """An 8x8 grey PNG of exactly ``count`` chunks, padded with empty private ``prVt`` chunks."""
    header = png_chunk(b"IHDR", struct.pack(">IIBBBBB", 8, 8, 8, 0, 0, 0, 0))
    image = png_chunk(b"IDAT", zlib.compress(png_rows(np.full((8, 8), 77, np.uint8))))
    padding = png_chunk(b"prVt", b"") * (count - 3)
    body = header + padding + image if before_idat else header + image + padding
    return b"\x89PNG\r\n\x1a\n" + body + png_chunk(b"IEND", b"")


def png_chunk_count(data: bytes) -> int:
    pos, count = 8, 0
    while pos < len(data):
        (length,) = struct.unpack_from(">I", data, pos)
        pos, count = pos + 12 + length, count + 1
    return count


def test_pngs_pillow_writes_stay_far_below_the_chunk_limit():
    noise = np.random.default_rng(0).integers(0, 256, (1024, 1024, 3), np.uint8)
    data = image_bytes(Image.fromarray(noise), "PNG")  # noise does not compress: IDAT after 64 KB IDAT
    chunks = png_chunk_count(data)
    assert len(data) > 3_000_000 and chunks > 40
    assert chunks * (20_000_000 // len(data) + 1) * 10 < MAX_PNG_CHUNKS  # a 20 MB one: 10x below


@pytest.mark.parametrize("before_idat", [True, False], ids=["before-idat", "after-idat"])
def test_png_of_300000_tiny_chunks_is_refused_at_the_chunk_limit(monkeypatch, before_idat):
    data = png_with_chunks(300_000, before_idat=before_idat)
    assert len(data) < 20_000_000
    crcs = []
    crc32 = zlib.crc32

    def counting_crc32(*args):
        crcs.append(1)
        return crc32(*args)

    monkeypatch.setattr(zlib, "crc32", counting_crc32)  # counts ours and Pillow's
    error = assert_invalid(data)
    assert error.message == f"The PNG has more than {MAX_PNG_CHUNKS:,} chunks."
    assert len(crcs) <= MAX_PNG_CHUNKS  # refused at the limit, not after walking 300,000 chunks


def test_png_at_the_chunk_limit_decodes_and_one_over_is_refused():
    decoded = decode_image(png_with_chunks(MAX_PNG_CHUNKS))
    assert pixels(decoded.image).reshape(-1).tolist() == [77] * (8 * 8 * 3)
    assert png_chunk_count(png_with_chunks(MAX_PNG_CHUNKS)) == MAX_PNG_CHUNKS
    assert "chunks" in assert_invalid(png_with_chunks(MAX_PNG_CHUNKS + 1)).message


def test_error_message_does_not_echo_pillow():
    data = image_bytes(gradient_image(200, 150), "JPEG")[:1000]
    with pytest.raises(OSError) as pillow_error:
        Image.open(io.BytesIO(data)).load()
    error = assert_invalid(data)
    assert str(pillow_error.value) not in error.message
    assert error.message == InvalidImage.default_detail


# --- unsupported formats -------------------------------------------------------------------------


def forbid_load(monkeypatch, image_class) -> list:
    calls = []

    def load(self):
        calls.append(self.format)
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(image_class, "load", load)
    return calls


@pytest.mark.parametrize(
    ("fmt", "picture", "image_class"),
    [
        ("ICO", Image.new("RGBA", (32, 32), "red"), IcoImagePlugin.IcoImageFile),
        ("PCX", Image.new("RGB", (8, 8), "red"), PcxImagePlugin.PcxImageFile),
        ("PPM", Image.new("RGB", (8, 8), "red"), PpmImagePlugin.PpmImageFile),
        ("TGA", Image.new("RGB", (8, 8), "red"), TgaImagePlugin.TgaImageFile),
        ("EPS", Image.new("RGB", (8, 8), "red"), EpsImagePlugin.EpsImageFile),
    ],
)
def test_formats_outside_the_list_are_unsupported_before_decoding(monkeypatch, fmt, picture, image_class):
    data = image_bytes(picture, fmt)
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.format == fmt  # Pillow does know it
    calls = forbid_load(monkeypatch, image_class)
    error = error_from(data, key="upload")
    assert type(error) is UnsupportedImage
    assert error.status_code == 415 and error.code == "unsupported_image" and error.key == "upload"
    assert "JPEG, PNG" in error.message  # says what to send instead
    assert calls == []


# --- size limits ---------------------------------------------------------------------------------


def lying_png(width: int, height: int) -> bytes:
    """A well-formed PNG (valid CRCs) whose header claims a huge size over a few bytes of data."""
    return handmade_png(width, height, bit_depth=8, color_type=0, raw=b"\x00" * 64)


def assert_too_large(data: bytes, **kwargs) -> TooLarge:
    started = time.perf_counter()
    error = error_from(data, key="big", **kwargs)
    assert time.perf_counter() - started < 1.0  # refused from the header, nothing decoded
    assert type(error) is ImageTooLarge
    assert error.status_code == 413 and error.code == "image_too_large" and error.key == "big"
    return error


def test_png_header_claiming_20000_by_20000_is_too_large_without_decoding():
    data = lying_png(20000, 20000)
    assert len(data) < 200
    assert_too_large(data)  # past twice Pillow's limit: Pillow's own DecompressionBombError, mapped


def test_header_over_max_pixels_is_too_large_before_load(monkeypatch):
    calls = forbid_load(monkeypatch, ImageFile.ImageFile)
    error = assert_too_large(lying_png(9000, 9000))  # 81 Mpx: under Pillow's limits, over ours
    assert "9000x9000" in error.message
    assert calls == []


def test_pillow_decompression_bomb_warning_becomes_too_large_and_does_not_escape():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert_too_large(lying_png(10000, 10000), max_pixels=150_000_000)  # Pillow warns past ~89 Mpx
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_max_pixels_is_respected():
    data = image_bytes(gradient_image(100, 100), "PNG")
    assert decode_image(data, max_pixels=10_000).image.size == (100, 100)
    assert_too_large(data, max_pixels=9_999)


def test_zero_sized_header_is_invalid_image():
    assert_invalid(lying_png(0, 10))


# --- draft (reduced-scale JPEG decoding) ---------------------------------------------------------


@pytest.fixture(scope="module")
def large_jpeg() -> tuple[bytes, Image.Image]:
    """A 4000x3000 photo-like JPEG (smooth gradients, shapes, edges) and its full decode."""
    picture = gradient_image(4000, 3000)
    draw = ImageDraw.Draw(picture)
    for i in range(12):
        draw.ellipse((300 * i, 200 * i, 300 * i + 900, 200 * i + 600), outline=(20 * i, 255 - 20 * i, 90), width=40)
    data = image_bytes(picture, "JPEG", quality=90)
    return data, decode_image(data).image


def shortest_side_to(image: Image.Image, side: int) -> np.ndarray:
    scale = side / min(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return pixels(image.resize(size, Image.Resampling.BICUBIC))


def test_draft_decodes_a_large_jpeg_at_reduced_scale_that_resizes_the_same(large_jpeg):
    data, full = large_jpeg
    assert full.size == (4000, 3000)
    decoded = decode_image(data, draft_min_side=224)
    assert decoded.image.size == (1000, 750)  # 1/4: 1/8 would give 375 < 448
    assert min(decoded.image.size) >= 448
    assert decoded.original_size == (4000, 3000)
    difference = np.abs(shortest_side_to(decoded.image, 224) - shortest_side_to(full, 224))
    assert difference.mean() < 1.5


@pytest.mark.parametrize(
    ("min_side", "size"), [(100, (500, 375)), (300, (1000, 750)), (700, (2000, 1500)), (800, (4000, 3000))]
)
def test_draft_keeps_the_shortest_side_at_least_twice_min_side(large_jpeg, min_side, size):
    decoded = decode_image(large_jpeg[0], draft_min_side=min_side)
    assert decoded.image.size == size
    assert min(decoded.image.size) >= 2 * min_side


def test_draft_decodes_once_and_orientation_still_applies(monkeypatch):
    data = image_bytes(gradient_image(1600, 1200), "JPEG", quality=90, exif=orientation_exif(6))
    decoders = []
    original_getdecoder = Image._getdecoder

    def counting_getdecoder(mode, decoder_name, args, extra=()):
        decoders.append((decoder_name, extra))
        return original_getdecoder(mode, decoder_name, args, extra)

    monkeypatch.setattr(Image, "_getdecoder", counting_getdecoder)
    decoded = decode_image(data, draft_min_side=100)
    assert decoders == [("jpeg", (4, 0))]  # one libjpeg pass, at 1/4 scale
    assert decoded.image.size == (300, 400)  # drafted, then turned upright
    assert decoded.original_size == (1600, 1200)
    monkeypatch.undo()
    drafted = Image.open(io.BytesIO(data))
    drafted.draft("RGB", (400, 300))
    assert np.array_equal(np.asarray(decoded.image), np.asarray(UPRIGHT[6](drafted.convert("RGB"))))


def test_without_draft_min_side_a_jpeg_decodes_at_full_size():
    data = image_bytes(gradient_image(1200, 900), "JPEG")
    assert decode_image(data).image.size == (1200, 900)
    assert decode_image(data, draft_min_side=1000).image.size == (1200, 900)


def test_draft_is_ignored_for_formats_other_than_jpeg():
    data = image_bytes(gradient_image(1200, 900), "PNG")
    assert decode_image(data, draft_min_side=64).image.size == (1200, 900)


# --- keys and fuzzing ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [b"", b"not an image", image_bytes(Image.new("RGB", (8, 8)), "PCX"), lying_png(20000, 20000)],
    ids=["empty", "text", "unsupported", "too-large"],
)
def test_errors_carry_the_part_key(data):
    assert error_from(data, key="image-7").key == "image-7"
    assert error_from(data).key is None


def mutations(data: bytes, count: int, seed: int):
    rng = random.Random(seed)
    for _ in range(count):
        out = bytearray(data)
        kind = rng.choice(["flip", "flip", "overwrite", "truncate", "flip+truncate"])
        if "flip" in kind:
            for _ in range(rng.randint(1, 8)):
                out[rng.randrange(len(out))] ^= rng.randint(1, 255)
        if kind == "overwrite":  # hits sizes and lengths with extreme values
            at = rng.randrange(len(out) - 4)
            out[at : at + 4] = rng.choice([b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\x00\x10"])
        if "truncate" in kind:
            del out[rng.randrange(1, len(out)) :]
        yield bytes(out)


@pytest.mark.parametrize(
    ("fmt", "picture"),
    [("JPEG", gradient_image(64, 48)), ("PNG", rgba_picture(64, 48))],
)
def test_fuzzed_bytes_decode_to_rgb_or_raise_api_errors_only(fmt, picture):
    data = image_bytes(picture, fmt, **({"exif": orientation_exif(6)} if fmt == "JPEG" else {}))
    outcomes = {"decoded": 0, "refused": 0}
    for mutated in mutations(data, 200, seed=sum(fmt.encode())):
        try:
            decoded = decode_image(mutated, key="fuzz")
        except ApiError as error:
            assert error.key == "fuzz"
            outcomes["refused"] += 1
        else:
            assert decoded.image.mode == "RGB" and min(decoded.image.size) > 0
            outcomes["decoded"] += 1
    assert outcomes["refused"] > 0
