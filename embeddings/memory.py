"""A worker's memory budget for requests in flight: what their bodies and their decoded images may
hold at once (``CLIP_WORKER_MEMORY_MB``), beside the model and the libraries.

Work is admitted against it **before** it is done, so a burst costs the worker at most the budget:

- the edge (clipsite/workers.py) holds ``BODY_COST_FACTOR`` times a body's length from its headers (or, for
  a chunked body, as it arrives) until the answer is sent: the raw bytes, their parsed copy (multipart
  parts, or a JSON document and its decoded images) and the request's own objects;
- each image a request decodes holds the bytes its decode needs (``decode_bytes``), from its header,
  until the request decodes its next image or ends: a request holds one decoded picture at a time.

What does not fit now is refused with 503 ``overloaded`` and ``Retry-After``; what could never fit
beside its own body is refused with 413. The model's own memory is not counted here: README gives a
worker's and a replica's worst case as the model's measured memory plus this budget.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
import time
from contextlib import contextmanager
from contextvars import ContextVar

from clipsite.config import BODY_COST_FACTOR

# Bytes a pixel of each decoded mode takes in Pillow (multi-band images take 4 whatever their bands).
_MODE_BYTES = {"1": 1, "L": 1, "P": 1, "I;16": 2, "I;16L": 2, "I;16B": 2, "I;16N": 2}
_RGB_OUT = 4  # the RGB picture every decode ends in
_CONVERSION_EXTRA = {"I": 16, "F": 16, "I;16": 4, "I;16L": 4, "I;16B": 4, "I;16N": 4}  # numpy steps
_BAND_BYTES = 16 << 20  # the band of rows transparency is composited in (embeddings/images.py)
_FORMAT_EXTRA = {"WEBP": 12}  # bytes a pixel the format's decoder holds beside the image (measured)


TRIM_AFTER_BYTES = 32 << 20  # released since the last trim before the heap is given back
TRIM_EVERY_S = 1.0  # at most this often


def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


class HeapTrimmer:
    """Gives the C heap's free pages back to the system once the budget has let go of a lot.

    A decoded image or a body of a few MB is allocated from the heap, not mapped on its own (glibc's
    mmap threshold rises to 32 MB as large blocks are freed), and the heap keeps those pages when they
    are freed: a worker that decoded a few large pictures stays that much larger for good (measured:
    +200 MB in 400 requests of the hostile mix). ``malloc_trim`` hands them back. It runs in a thread of
    its own, never on the event loop or a request's thread, at most once a second."""

    def __init__(self):
        self._trim = _malloc_trim()
        self._wake = threading.Event()
        self._released = 0
        self._last = 0.0
        self._thread: threading.Thread | None = None
        self.trims = 0

    def released(self, size: int) -> None:
        """Called under the budget's lock."""
        if self._trim is None:
            return
        self._released += size
        if self._released >= TRIM_AFTER_BYTES:
            self._released = 0
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="heap-trim", daemon=True)
                self._thread.start()
            self._wake.set()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            pause = self._last + TRIM_EVERY_S - time.monotonic()
            if pause > 0:
                time.sleep(pause)
            self._trim(0)
            self.trims += 1
            self._last = time.monotonic()


class MemoryBudget:
    """Bytes reserved against a total, shared by the event loop and the request threads of a worker."""

    def __init__(self, total: int):
        self.total = total
        self.used = 0
        self._lock = threading.Lock()
        self.trimmer = HeapTrimmer()

    def try_reserve(self, size: int) -> bool:
        with self._lock:
            if self.used + size > self.total:
                return False
            self.used += size
            self._show()
            return True

    def reserve(self, size: int) -> None:
        """Hold ``size`` bytes that are already spent (an answer being sent), over the total if need be:
        what comes next finds less room."""
        with self._lock:
            self.used += size
            self._show()

    def release(self, size: int) -> None:
        with self._lock:
            self.used = max(0, self.used - size)
            self._show()
            self.trimmer.released(size)

    def _show(self) -> None:
        from embeddings import metrics

        metrics.MEMORY_HELD.set(self.used)


_budget: MemoryBudget | None = None
_budget_lock = threading.Lock()


def budget() -> MemoryBudget:
    """This process's budget, sized by the configuration in force."""
    global _budget
    if _budget is None:
        from clipsite.config import current

        with _budget_lock:
            if _budget is None:
                _budget = MemoryBudget(current().limits.worker_memory_bytes)
    return _budget


def reset_budget() -> None:
    """Forget the budget (tests change the configuration)."""
    global _budget
    _budget = None


def body_bytes(length: int) -> int:
    """What a body of ``length`` bytes holds while its request is served."""
    return BODY_COST_FACTOR * length


def decode_bytes(
    mode: str,
    width: int,
    height: int,
    *,
    turns: bool,
    fmt: str = "",
    stored: tuple[int, int] | None = None,
    progressive: bool = False,
) -> int:
    """What decoding an image of ``mode`` and size (after any draft) holds at its peak: the decoded
    pixels, a turned copy where EXIF orientation turns it, the numpy steps of 16-bit and float modes,
    the RGB result and a band of compositing (measured: a palette PNG with transparency 6 bytes a pixel,
    RGBA 8.3, RGB 8); and what the format's decoder keeps beside them: libwebp's two RGBA canvases and a
    copy (WebP measured at 19 bytes a pixel), libjpeg's coefficients of a progressive file at its stored
    size whatever the draft (2 bytes a sample)."""
    source = _MODE_BYTES.get(mode, 4)
    per_pixel = source * (2 if turns else 1) + _CONVERSION_EXTRA.get(mode, 0) + _RGB_OUT
    size = width * height * (per_pixel + _FORMAT_EXTRA.get(fmt, 0)) + _BAND_BYTES
    if progressive and stored is not None:
        size += 2 * len(mode if mode != "RGB" else "YCC") * stored[0] * stored[1]
    return size


class RequestMemory:
    """What one request holds: its body (held by the edge, counted here to know what else can fit)
    and the image it is decoding now."""

    def __init__(self, body: int):
        self.body = body
        self.decode = 0

    def hold_decode(self, size: int, *, key: str | None) -> None:
        """Hold ``size`` bytes for the image about to be decoded, in place of the previous one's."""
        from embeddings import errors

        pool = budget()
        self.release()
        if self.body + size > pool.total:
            raise errors.ImageTooLarge(
                f"Decoding this image needs about {size // 2**20} MB, more than a worker gives one request "
                f"beside its body: send a smaller image (fewer pixels), or fewer per request.",
                key=key,
            )
        if not pool.try_reserve(size):
            raise errors.Overloaded(
                "The server is decoding as many images as its memory allows; try again in a moment.", key=key
            )
        self.decode = size

    def release(self) -> None:
        if self.decode:
            budget().release(self.decode)
            self.decode = 0


# The body bytes the edge holds for the request this thread serves (set by the worker around it).
edge_body_hold: ContextVar[int] = ContextVar("edge_body_hold", default=0)
_current: ContextVar[RequestMemory | None] = ContextVar("request_memory", default=None)


@contextmanager
def request_memory():
    """A request's share of the budget (the edge middleware wraps every request in it)."""
    memory = RequestMemory(edge_body_hold.get())
    token = _current.set(memory)
    try:
        yield memory
    finally:
        memory.release()
        _current.reset(token)


def hold_decode(mode: str, width: int, height: int, *, key: str | None, **how) -> None:
    """Admit the decode of one image of the current request (``how``: decode_bytes' keywords). Outside a
    request (``manage.py embed``, which decodes one image at a time) there is nothing to admit."""
    memory = _current.get()
    if memory is not None:
        memory.hold_decode(decode_bytes(mode, width, height, **how), key=key)
