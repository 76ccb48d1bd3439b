"""Decoding and validating uploaded images: bytes in, one upright 8-bit RGB picture out.

Everything here treats the bytes as hostile. The order of the checks is the point of the module:

1. for PNG, walk the chunks before Pillow sees them: at most ``MAX_PNG_CHUNKS``, each one's CRC
   verified (Pillow skips image data's). Pillow's PNG opener is not header-only: its ``open`` walks
   every chunk before the first IDAT and its ``load()`` every one after, in Python, so a file of
   tiny chunks must be refused first;
2. identify the format from the header; formats outside ``SUPPORTED_FORMATS`` are refused before any
   pixel is decoded (EPS, for one, would run Ghostscript on ``load()``);
3. check the pixel count stated in the header against ``max_pixels`` (decompression bombs);
4. optionally ask libjpeg for a reduced-scale decode, then decode once, fully;
5. apply the EXIF orientation and convert whatever mode the file holds to RGB, compositing
   transparency on white exactly as transformers' ``convert_to_rgb`` does.

Any exception Pillow raises on the way is a property of the bytes and becomes ``InvalidImage``;
nothing of its text reaches the client.
"""

from __future__ import annotations

import io
import logging
import struct
import warnings
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from embeddings import memory
from embeddings.errors import ApiError, ImageTooLarge, InvalidImage, RequestTooManyPixels, UnsupportedImage

logger = logging.getLogger(__name__)

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "WEBP", "GIF", "BMP", "TIFF"})
DEFAULT_MAX_PIXELS = 50_000_000

_JPEG_FORMATS = frozenset({"JPEG", "MPO"})
# Pillow has no opener named MPO: its JPEG opener returns an MPO image when the file is one.
_OPENERS = tuple(sorted(SUPPORTED_FORMATS - {"MPO"}))
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_MAX_CHUNK_LENGTH = 2**31 - 1  # the PNG spec's limit
# Pillow writes IDAT in 64 KB chunks and libpng in 8 KB ones: a PNG at the default 20 MiB upload
# limit has about 320 or 2,560 chunks, plus a few of metadata (an APNG adds two per frame, so one
# of over ~5,000 frames is refused too). 10,000 keeps that margin and bounds the chunk walks (ours,
# then Pillow's, a few microseconds a chunk each) to milliseconds; a file past it is made of tiny
# chunks, which encoders do not write and an attacker does.
MAX_PNG_CHUNKS = 10_000
# v * 255 / 65535 == v / 257, rounded; 257 is odd, so there are no ties.
_SIXTEEN_TO_EIGHT = ((np.arange(65536, dtype=np.uint32) + 128) // 257).astype(np.uint8)
_WHITE = (255, 255, 255, 255)


@dataclass(frozen=True)
class DecodedImage:
    """An upload turned into pixels, with what later code may want to know about the file."""

    image: Image.Image  # mode "RGB", EXIF orientation applied, loaded, no metadata
    format: str  # Pillow's format name, one of SUPPORTED_FORMATS
    original_size: tuple[int, int]  # (w, h) as stored in the file, before draft and orientation


def decode_image(
    data: bytes,
    *,
    key: str | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    draft_min_side: int | None = None,
    pixel_budget: int | None = None,
) -> DecodedImage:
    """Decode uploaded bytes into an upright RGB image, or raise an ``ApiError`` naming ``key``.

    ``max_pixels`` bounds width * height as stated in the header, checked before decoding (Pillow's
    own ``Image.MAX_IMAGE_PIXELS`` guard applies as well). Only the first frame of an animated or
    multi-page file is read; the size checked is the one Pillow reports after reading that frame's
    header (for GIF, the canvas grown to fit it), and later frames are never touched.

    With ``draft_min_side``, a large JPEG is decoded by libjpeg at 1/2, 1/4 or 1/8 scale, keeping its
    shortest side >= 2 * draft_min_side. EXIF orientation is applied after that.

    ``pixel_budget``: how many pixels the request may still decode; an image that would decode to more
    (after the draft) is refused before decoding with ``RequestTooManyPixels`` (413).

    Raises ``InvalidImage`` (400) for bytes that are not a sound image, ``UnsupportedImage`` (415)
    for a format Pillow knows but we do not accept, ``TooLarge`` (413, code ``image_too_large``)
    for too many pixels.
    """
    if max_pixels < 1:
        raise ValueError("max_pixels must be positive")
    if draft_min_side is not None and draft_min_side < 1:
        raise ValueError("draft_min_side must be positive")
    if not data:
        raise InvalidImage("The image file is empty.", key=key)

    # Pillow warns (and past twice its limit, raises) about decompression bombs: make the warning an
    # error so it cannot slip through as a log line. Its UserWarnings are about flaws in the bytes
    # (corrupt EXIF...) that it works around; silence them, or a "-W error" run would refuse a
    # sound photo. Until Python 3.14 catch_warnings swaps process-wide state, so threads can race;
    # a filter left behind that way only concerns these warnings of Pillow's.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            if data.startswith(_PNG_SIGNATURE):  # only Pillow's PNG opener accepts these bytes
                _check_png_chunks(data, key)
            with _open_supported(data, key) as im:
                fmt = im.format
                original_size = _stored_size(im)
                _check_pixel_count(im.size, max_pixels, key)
                if draft_min_side is not None and fmt in _JPEG_FORMATS:
                    _draft_jpeg(im, draft_min_side)
                if pixel_budget is not None and im.size[0] * im.size[1] > pixel_budget:
                    raise RequestTooManyPixels(
                        f"This image decodes to {im.size[0]}x{im.size[1]} pixels, more than the "
                        f"{max(pixel_budget, 0):,} the request has left: send fewer or smaller images per request.",
                        key=key,
                    )
                memory.hold_decode(  # 503 if it cannot fit now
                    im.mode,
                    *im.size,
                    key=key,
                    turns=_turns(im),
                    fmt=fmt,
                    stored=original_size,
                    progressive=bool(im.info.get("progressive") or im.info.get("progression")),
                )
                im.load()
                _apply_exif_orientation(im)
                rgb = _to_rgb(im)
        except ApiError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
            raise ImageTooLarge("The image has more pixels than the server will decode.", key=key) from exc
        except Exception as exc:
            # Pillow's plugins raise a wide, undocumented set of types on bad input (OSError,
            # SyntaxError, ValueError, struct.error, EOFError, IndexError, TypeError, KeyError,
            # zlib.error, MemoryError...). Whatever they raise here is about these bytes.
            logger.debug("Undecodable image for key %r: %s: %s", key, type(exc).__name__, exc)
            raise InvalidImage(key=key) from exc

    rgb.info = {}  # pixels only: stale metadata (an orientation tag) must not be applied twice
    return DecodedImage(image=rgb, format=fmt, original_size=original_size)


def _open_supported(data: bytes, key: str | None) -> Image.Image:
    """Open (header only) with the supported plugins; tell unknown bytes from unsupported formats."""
    try:
        return Image.open(io.BytesIO(data), formats=_OPENERS)
    except Image.UnidentifiedImageError:
        pass
    fmt = _unsupported_format_of(data)
    if fmt is None:
        raise InvalidImage("The file is not an image in a format the server can read.", key=key)
    # The name stays out of the message: magic numbers collide (a TGA file can start like a CUR).
    logger.debug("Refusing an image that looks like %s for key %r", fmt, key)
    raise UnsupportedImage("This image format is not supported; send JPEG, PNG, WebP, GIF, BMP or TIFF.", key=key)


def _unsupported_format_of(data: bytes) -> str | None:
    """Name the format of bytes no supported plugin would open, without decoding a pixel.

    Plugins with a magic number are asked about the first bytes only: opening is not always
    header-only (Pillow's ICO opener decodes the icon, which may be an embedded PNG of any size).
    The few without one (TGA, IM, SPIDER...) can only tell by opening; their openers read headers.
    """
    Image.init()
    prefix = data[:16]
    no_magic = []
    for fmt, (_, accept) in Image.OPEN.items():
        if fmt in SUPPORTED_FORMATS:
            continue
        if accept is None:
            no_magic.append(fmt)
        elif _accepts(accept, prefix):
            return fmt
    try:
        with Image.open(io.BytesIO(data), formats=no_magic) as im:
            return im.format
    except Image.UnidentifiedImageError:
        return None


def _accepts(accept: Callable[[bytes], bool | str], prefix: bytes) -> bool:
    try:
        return bool(accept(prefix))  # a str means "this format, but its codec is not installed"
    except (IndexError, TypeError, ValueError, struct.error):  # as Image.open tolerates them
        return False


def _stored_size(im: Image.Image) -> tuple[int, int]:
    """The size as stored; Pillow's TIFF opener already reports it turned by the orientation tag."""
    if im.format == "TIFF":
        return im.tag_v2[256], im.tag_v2[257]  # ImageWidth, ImageLength
    return im.size


MAX_ASPECT_RATIO = 100


def _check_pixel_count(size: tuple[int, int], max_pixels: int, key: str | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise InvalidImage("The image has no pixels.", key=key)
    if width * height > max_pixels:
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels; the server decodes at most {max_pixels:,} pixels.", key=key
        )
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        # Resizing the short side to the model's input would blow a 1x50000 sliver up to gigabytes.
        raise ImageTooLarge(
            f"The image is {width}x{height} pixels: its sides differ by more than {MAX_ASPECT_RATIO}:1.", key=key
        )


def _check_png_chunks(data: bytes, key: str | None) -> None:
    """Verify a PNG's chunk structure and every chunk's CRC (Pillow does not check IDAT's), walking
    at most ``MAX_PNG_CHUNKS`` chunks."""
    corrupt = InvalidImage("The PNG file is corrupt or truncated.", key=key)
    size = len(data)
    pos = len(_PNG_SIGNATURE)
    with memoryview(data) as view:
        if view[:pos] != _PNG_SIGNATURE:
            raise corrupt
        first = True
        for _ in range(MAX_PNG_CHUNKS):
            if pos + 12 > size:
                raise corrupt  # ran out of bytes before IEND
            length, chunk_type = struct.unpack_from(">I4s", data, pos)
            end = pos + 12 + length
            if length > _PNG_MAX_CHUNK_LENGTH or not chunk_type.isalpha() or end > size:
                raise corrupt
            if first and chunk_type != b"IHDR":
                raise corrupt
            (crc,) = struct.unpack_from(">I", data, end - 4)
            if zlib.crc32(view[pos + 4 : end - 4]) != crc:
                raise corrupt
            if chunk_type == b"IEND":
                return  # bytes after IEND are ignored, as every decoder does
            pos, first = end, False
    # 400 rather than 413: the file is not large, and smaller pixels would not help; its structure is
    # what no sound encoder writes.
    raise InvalidImage(f"The PNG has more than {MAX_PNG_CHUNKS:,} chunks.", key=key)


def _draft_jpeg(im: Image.Image, min_side: int) -> None:
    """Ask libjpeg for the smallest 1/8, 1/4 or 1/2 scale keeping the short side >= 2 * min_side."""
    width, height = im.size
    for scale in (8, 4, 2):
        if min(width, height) // scale >= 2 * min_side:
            # Pillow picks the largest scale s with size // request >= s: asking for size // scale
            # yields exactly `scale` (the quotient lies in [scale, 2 * scale)).
            im.draft("RGB", (width // scale, height // scale))
            return


def _turns(im: Image.Image) -> bool:
    """Whether EXIF orientation will turn or flip the picture (a second full-size copy), read before load."""
    try:
        return im.getexif().get(0x0112, 1) in (2, 3, 4, 5, 6, 7, 8)
    except Exception:  # noqa: BLE001 - malformed EXIF: counted as turning, the safe side
        return True


def _apply_exif_orientation(im: Image.Image) -> None:
    """Turn the loaded image upright in place; malformed EXIF leaves it as stored."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except Exception as exc:  # noqa: BLE001 - metadata, however broken, must not fail an upload
        # Raised either while reading the tag (nothing turned) or while rewriting the metadata
        # afterwards (pixels already turned); both leave a sensible picture.
        logger.debug("Ignoring malformed EXIF: %s: %s", type(exc).__name__, exc)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any mode to a new RGB image, compositing transparency on white like transformers."""
    if im.mode in _SIXTEEN_BIT_MODES or (im.mode == "I" and _is_sixteen_bit(im)):
        return _sixteen_bit_to_rgb(im)
    if im.mode in ("I", "F"):
        # 32-bit integers or floats have no agreed white: values are clipped to 0..255 (NaN is 0).
        values = np.asarray(im)
        if values.dtype.kind == "f":
            values = np.rint(np.nan_to_num(values, nan=0.0))
        return Image.fromarray(np.clip(values, 0, 255).astype(np.uint8), "L").convert("RGB")
    if im.mode == "La":
        # Pillow cannot convert La directly; RGBa with the same premultiplied values can.
        luminance, alpha = im.split()
        im = Image.merge("RGBa", (luminance, luminance, luminance, alpha))
    bands = im.getbands()
    if "A" in bands or "a" in bands or im.info.get("transparency") is not None:
        return _composite_on_white(im)
    return im.convert("RGB")


# Rows of an image composited at once: transformers' recipe makes three full-size RGBA copies (12 bytes
# a pixel beside the source); a band of about a million pixels at a time makes them megabytes.
COMPOSITE_BAND_PIXELS = 1 << 20


def _composite_on_white(im: Image.Image) -> Image.Image:
    """transformers.image_transforms.convert_to_rgb (RGBA, alpha_composite on white, RGB), step for
    step so vectors match theirs, but one band of rows at a time: every pixel's result depends on that
    pixel alone, so the bands give the same bytes as the whole."""
    width, height = im.size
    out = Image.new("RGB", im.size)
    rows = max(1, COMPOSITE_BAND_PIXELS // width)
    for top in range(0, height, rows):
        box = (0, top, width, min(height, top + rows))
        rgba = im.crop(box).convert("RGBA")  # crop keeps the palette and the transparency
        background = Image.new("RGBA", rgba.size, _WHITE)
        out.paste(Image.alpha_composite(background, rgba).convert("RGB"), box)
    return out


def _is_sixteen_bit(im: Image.Image) -> bool:
    """Whether a mode "I" image holds 16-bit samples (PNG always; TIFF per BitsPerSample)."""
    if im.format == "PNG":
        return True
    tags = getattr(im, "tag_v2", None)
    bits = tags.get(258) if tags is not None else None
    return bool(bits) and max(bits) <= 16


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    """Scale 16-bit grey by value (v / 257, rounded), so a 16-bit twin of an 8-bit file matches it."""
    values = np.asarray(im)
    if values.dtype.kind == "i":  # mode "I": signed storage, or signed 16-bit TIFF samples
        values = np.clip(values, 0, 65535)
    grey = _SIXTEEN_TO_EIGHT[values]
    transparent = im.info.get("transparency")
    if isinstance(transparent, int):
        grey[values == transparent] = 255  # a fully transparent pixel over white is white
    return Image.fromarray(grey, "L").convert("RGB")
