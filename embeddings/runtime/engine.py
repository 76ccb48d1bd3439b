"""The engine: the one object services talk to. Decoded images and texts in, float32 vectors out.

It owns everything between a request and the backends:
- preprocessing, in the caller's thread (``Preprocessing``: pixels and token ids);
- admission: how many items and how many image pixels may wait, refused at once with ``QueueFull``;
- per-request deadlines: a request that waits past its own gets ``DeadlineExceeded``, and its queued
  work is dropped;
- the queue and the batching: one inference thread per engine takes the kind (image or text) of the
  oldest waiting item, gathers up to ``max_batch`` items of that kind (waiting at most ``max_wait_ms``
  for more while the batch is not full, and only while the last batch of that kind held items of more
  than one request: a lone client is never made to wait for company that is not coming), runs one forward
  and hands each request its rows. A
  request's images and texts are queued together, in one step.
- failures: a batch that fails is split in halves until the item at fault fails alone, so a bad item
  fails only its own request.
- visibility: each forward gets the next batch id (``Embedded.batches`` lists a request's), and its
  size, kind and the queue's depth go to embeddings/metrics.py.
Nothing else in the project batches, and nothing here knows HTTP.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from embeddings import metrics
from embeddings.runtime import coordination
from embeddings.runtime.backends import Backend
from embeddings.runtime.preprocessing import Preprocessing, Tokens

logger = logging.getLogger(__name__)

KINDS = ("image", "text")


class QueueFull(Exception):
    """More items (or pixels) are waiting than admission allows: answer 503 rather than pile up."""


class DeadlineExceeded(Exception):
    """The request waited past its deadline; its queued work was dropped."""


class InferenceFailed(Exception):
    """The backend failed on this request's input (alone, after the batch was split)."""


class EngineStopped(Exception):
    """The engine was closed while the request waited."""


@dataclass(frozen=True)
class EngineSettings:
    max_batch: int = 32
    max_wait_ms: float = 2.0
    max_queue: int = 1024
    max_queue_pixels: int = 50_000_000
    timeout_s: float = 60.0


@dataclass(frozen=True)
class ModelInfo:
    """What the engine knows of its model; read from the manifest, never from the weights."""

    name: str  # its identity here (a hub id, a folder's path): logs, the category cache, bulk journals
    family: str  # transformers' model_type: clip, siglip, chinese_clip, altclip, ...
    dim: int
    logit_scale: float  # exp of the model's learned temperature
    logit_bias: float | None  # SigLIP's bias: its probabilities are sigmoids, not a softmax
    test_model: dict | None = None  # the marker of a random-weight test model
    served_name: str = ""  # what answers call it (CLIP_SERVED_MODEL_NAME or its default); "": ``name``


@dataclass(frozen=True)
class Embedded:
    images: np.ndarray  # (n_images, dim) float32 raw projections, in the order given
    texts: np.ndarray  # (n_texts, dim)
    truncated: list[bool]  # per text: cut to the model's context
    batches: list[int] = field(default_factory=list)  # the ids of the batches its items ran in, in order
    text_tokens: list[int] = field(default_factory=list)  # per text: the tokens the model read (after any cut)


class _Request:
    """One caller's items in flight; the inference thread fills its rows."""

    def __init__(self, counts: dict[str, int], dim: int, deadline: float):
        self.rows = {kind: np.zeros((n, dim), np.float32) for kind, n in counts.items()}
        self.pending = sum(counts.values())
        self.deadline = deadline
        self.error: Exception | None = None
        self.done = threading.Event()
        self.batches: list[int] = []  # filled by the inference thread only

    @property
    def dropped(self) -> bool:
        """Its work no longer wanted: failed, or past its deadline (the caller has given up)."""
        return self.error is not None or time.monotonic() > self.deadline

    def fill(self, kind: str, index: int, row: np.ndarray) -> None:
        self.rows[kind][index] = row
        self.pending -= 1
        if self.pending == 0:
            self.done.set()

    def fail(self, error: Exception) -> None:
        if self.error is None:
            self.error = error
        self.done.set()


@dataclass
class _Item:
    request: _Request
    index: int
    payload: object  # (3, H, W) pixels or Tokens
    pixels: int
    queued_at: float = field(default_factory=time.monotonic)
    client: str = ""


class Engine:
    """One model's towers behind one queue. ``embed`` is safe to call from any number of threads."""

    def __init__(
        self,
        *,
        backends: dict[str, Backend],
        preprocessing: Preprocessing,
        info: ModelInfo,
        settings: EngineSettings | None = None,
        name: str = "clip-engine",
    ):
        self.backends = backends
        self.preprocessing = preprocessing
        self.info = info
        self.settings = settings or EngineSettings()
        # Per kind, one queue per client (in the order they are served, round robin), so one client's
        # large requests neither take every slot (admission caps a client at half the queue) nor make
        # everyone else's items wait behind all of theirs.
        self._queues: dict[str, OrderedDict[str, deque[_Item]]] = {kind: OrderedDict() for kind in KINDS}
        self._queued_by_client: Counter[str] = Counter()
        self._forward_started: float | None = None
        self._cond = threading.Condition()
        self._queued_items = 0
        self._company = dict.fromkeys(KINDS, False)  # the last batch of that kind held several requests' items
        self._queued_pixels = 0
        self._in_flight: set[_Request] = set()
        self._stopped = False
        self.batches_run = dict.fromkeys(KINDS, 0)
        self.items_run = dict.fromkeys(KINDS, 0)
        # Each forward that succeeds gets the next id; a request's answer lists the ids its items rode in.
        self._batch_ids = itertools.count(1)
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    # --- what services use -------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.info.name

    @property
    def served_name(self) -> str:
        """The model's name in answers: never a path of this machine (loading.served_name)."""
        return self.info.served_name or self.info.name

    @property
    def dim(self) -> int:
        return self.info.dim

    @property
    def is_test_model(self) -> bool:
        return self.info.test_model is not None

    @property
    def draft_min_side(self) -> int | None:
        return self.preprocessing.draft_min_side

    def describe(self) -> dict[str, str]:
        """Which backend and dtype serve each tower, e.g. {"image": "onnx/float32", ...}."""
        return {kind: f"{b.name}/{b.dtype}" for kind, b in self.backends.items()}

    def preprocess_image(self, image: Image.Image) -> np.ndarray:
        """An RGB PIL image as the model's (3, H, W) input: a caller may let the picture go right after."""
        return self.preprocessing.image(image)

    def embed(
        self,
        *,
        images: Sequence[Image.Image | np.ndarray] = (),
        texts: Sequence[str] = (),
        timeout: float | None = None,
        client: str = "",
    ) -> Embedded:
        """Vectors of ``images`` (RGB PIL images, or arrays from ``preprocess_image``) and ``texts``,
        computed together; blocks until done. ``client`` names who asks (a key, an address): each client
        gets a fair share of the queue.

        Raises QueueFull (admission), DeadlineExceeded (``timeout``, default the engine's), InferenceFailed
        or EngineStopped.
        """
        tokens = self.preprocessing.tokenize(texts) if texts else []
        pixels = [i if isinstance(i, np.ndarray) else self.preprocess_image(i) for i in images]
        return self._run(pixels, tokens, timeout, client)

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        return self.embed(texts=texts).texts

    def embed_images(self, images: Sequence[Image.Image]) -> np.ndarray:
        return self.embed(images=images).images

    def warm_up(self) -> None:
        """Embed one text and one blank image so the first request pays no lazy initialisation."""
        out = self.embed(images=[Image.new("RGB", (224, 224), (127, 127, 127))], texts=["a photo of a cat"])
        if out.texts.shape[1] != self.dim or not all(math.isfinite(x) for x in out.texts[0][:8]):
            raise RuntimeError("the model produced text vectors of the wrong size or non-finite values")

    def close(self) -> None:
        """Stop the inference thread, fail what still waits, and close the backends."""
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self._thread.join(timeout=30)
        for backend in {id(b): b for b in self.backends.values()}.values():
            backend.close()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stalled(self, limit_s: float) -> bool:
        """Whether the forward in flight has run longer than ``limit_s`` (a hung backend)."""
        started = self._forward_started
        return started is not None and time.monotonic() - started > limit_s

    def abort(self, reason: str) -> None:
        """Fail every request waiting, queued or in flight, at once, and refuse new ones: the worker is
        going away (a dead inference thread, a hung forward). The backends are not waited for."""
        error = EngineStopped(reason)
        with self._cond:
            self._stopped = True
            for queues in self._queues.values():
                for queue in queues.values():
                    for item in queue:
                        item.request.fail(error)
                queues.clear()
            self._queued_by_client.clear()
            for request in list(self._in_flight):
                request.fail(error)
            self._cond.notify_all()

    # --- admission and waiting ---------------------------------------------------------------
    def _run(self, pixels: list[np.ndarray], tokens: list[Tokens], timeout: float | None, client: str = "") -> Embedded:
        timeout = self.settings.timeout_s if timeout is None else timeout
        request = _Request({"image": len(pixels), "text": len(tokens)}, self.dim, time.monotonic() + timeout)
        items = [_Item(request, i, p, int(p.shape[-1] * p.shape[-2])) for i, p in enumerate(pixels)]
        text_items = [_Item(request, i, t, 0) for i, t in enumerate(tokens)]
        new_pixels = sum(item.pixels for item in items)
        if request.pending:
            with self._cond:
                if self._stopped:
                    raise EngineStopped("the engine is closed")
                if self._queued_items + request.pending > self.settings.max_queue:
                    raise QueueFull(f"{self._queued_items} items already waiting")
                if self._queued_by_client[client] + request.pending > self.client_share:
                    raise QueueFull(f"this client has {self._queued_by_client[client]} items waiting already")
                if new_pixels and self._queued_pixels + new_pixels > self.settings.max_queue_pixels:
                    raise QueueFull(f"{self._queued_pixels} image pixels already waiting")
                for kind, kind_items in (("image", items), ("text", text_items)):
                    if kind_items:
                        self._queues[kind].setdefault(client, deque()).extend(kind_items)
                for item in items + text_items:
                    item.client = client
                self._queued_by_client[client] += request.pending
                self._queued_items += request.pending
                self._queued_pixels += new_pixels
                self._publish_depth()
                self._cond.notify_all()
            if not request.done.wait(max(0.0, request.deadline - time.monotonic())):
                raise DeadlineExceeded(f"no answer within {timeout:g} s")
        if request.error is not None:
            raise request.error
        return Embedded(
            request.rows["image"],
            request.rows["text"],
            [t.truncated for t in tokens],
            sorted(request.batches),
            [len(t.ids) for t in tokens],
        )

    @property
    def client_share(self) -> int:
        """The most items one client may have waiting: half the queue, so others always find room."""
        return max(1, self.settings.max_queue // 2)

    # --- the inference thread ----------------------------------------------------------------
    def _take(self, kind: str, batch: list[_Item]) -> None:
        """Up to the batch's room from ``kind``'s queues, one item from each client in turn."""
        queues = self._queues[kind]
        while queues and len(batch) < self.settings.max_batch:
            client, queue = next(iter(queues.items()))
            item = queue.popleft()
            if queue:
                queues.move_to_end(client)
            else:
                del queues[client]
            self._queued_items -= 1
            self._queued_pixels -= item.pixels
            self._queued_by_client[client] -= 1
            if self._queued_by_client[client] <= 0:
                del self._queued_by_client[client]
            if not item.request.dropped:
                batch.append(item)
        self._publish_depth()

    def _depth(self, kind: str) -> int:
        return sum(len(q) for q in self._queues[kind].values())

    def _oldest(self, kind: str) -> float:
        return min((q[0].queued_at for q in self._queues[kind].values()), default=math.inf)

    def _publish_depth(self) -> None:
        for kind in self._queues:
            metrics.QUEUE_DEPTH.labels(kind).set(self._depth(kind))

    def _next_batch(self) -> tuple[str, list[_Item]] | None:
        with self._cond:
            while True:
                while not self._stopped and self._queued_items == 0:
                    self._cond.wait()
                if self._stopped:
                    return None
                kind = min(KINDS, key=self._oldest)
                batch: list[_Item] = []
                self._take(kind, batch)
                deadline = time.monotonic() + self.settings.max_wait_ms / 1000.0
                while self._company[kind] and batch and len(batch) < self.settings.max_batch and not self._stopped:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._cond.wait(remaining)
                    self._take(kind, batch)
                if batch:
                    # Measured (python manage.py bench): waiting 2 ms cost one client 4 ms a text;
                    # under load, batches of many make the wait pay.
                    self._company[kind] = len({id(item.request) for item in batch}) > 1
                    return kind, batch

    def _loop(self) -> None:
        while True:
            taken = self._next_batch()
            if taken is None:
                break
            self._forward(*taken)
        with self._cond:  # closed: whoever still waits is told, not left hanging
            for queues in self._queues.values():
                for queue in queues.values():
                    for item in queue:
                        item.request.fail(EngineStopped("the engine was closed"))
                queues.clear()
            self._queued_by_client.clear()
            self._publish_depth()

    def _compute(self, kind: str, batch: list[_Item]) -> np.ndarray:
        if kind == "image":
            pixels = np.stack([item.payload for item in batch])
            with coordination.busy():
                return self.backends["image"].image_features(pixels)
        ids, mask = self.preprocessing.pad([item.payload for item in batch])
        with coordination.busy():
            return self.backends["text"].text_features(ids, mask)

    def _forward(self, kind: str, batch: list[_Item]) -> None:
        batch = [item for item in batch if not item.request.dropped]
        if not batch:
            return
        started = time.perf_counter()
        self._in_flight = {item.request for item in batch}
        self._forward_started = time.monotonic()
        try:
            rows = self._compute(kind, batch)
        except Exception:  # noqa: BLE001 - find the item at fault: a bad item fails only its own request
            self._forward_started = None
            if len(batch) == 1:
                logger.exception("Inference failed for one %s item", kind)
                batch[0].request.fail(InferenceFailed("inference failed"))
                return
            half = len(batch) // 2
            self._forward(kind, batch[:half])
            self._forward(kind, batch[half:])
            return
        self._forward_started = None
        self._in_flight = set()
        batch_id = next(self._batch_ids)
        self.batches_run[kind] += 1
        self.items_run[kind] += len(batch)
        metrics.BATCH_SIZE.labels(kind).observe(len(batch))
        metrics.ITEMS.labels(kind).inc(len(batch))
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "batch %d: %d %s items in %.1f ms", batch_id, len(batch), kind, 1000 * (time.perf_counter() - started)
            )
        for item, row in zip(batch, rows, strict=True):
            if batch_id not in item.request.batches:  # before fill: the caller reads them once done
                item.request.batches.append(batch_id)
            item.request.fill(kind, item.index, row)
