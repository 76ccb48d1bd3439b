"""What the wearable API and its admin mean: rank enabled categories for a photo, record answers and feedback.

A category's text vector is CLIP's zero-shot recipe: the normalised mean of its prompts' normalised
vectors. Those vectors live in the database per (category, model, prompt) and in each process's memory
(``category_cache``); a request only checks that its memory is still current (one small query) and runs
one image forward pass and one small matrix product. When the database fails, that memory answers.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
from django.db import DatabaseError, transaction
from django.db.models import QuerySet
from django.utils import timezone

from clipsite.config import current
from embeddings import errors, metrics
from embeddings.logs import note_embedded
from embeddings.multipart import Part
from embeddings.runtime.engine import Engine
from embeddings.runtime.state import runtime
from embeddings.services import current_engine, image_of, l2_normalize
from wearable.models import Category, CategoryEmbedding, Feedback, Prediction, prompts_for

logger = logging.getLogger(__name__)

# Prompts encoded per forward pass when vectors are missing: one call for any table of normal size.
_ENCODE_CHUNK = 256
NO_VECTORS_WITHOUT_DATABASE = (
    "The database is not answering and this server holds no category vectors yet; try again in a few seconds."
)


def prompt_templates() -> list[str]:
    return list(current().wearable.prompt_templates)


# --- The cache of category vectors -----------------------------------------------------------------
@dataclass(frozen=True)
class CategoryRow:
    id: int
    name: str
    prompts: str
    display_order: int


@dataclass(frozen=True)
class CategoryMatrix:
    """The enabled categories' vectors for one model, as of one state of the table."""

    model_name: str
    stamp: tuple
    names: list[str]
    orders: list[int]
    vectors: np.ndarray  # (n_categories, dim) float32, rows of norm 1


def _enabled_rows() -> tuple[tuple, list[CategoryRow]]:
    """The enabled categories in one query, and the stamp that changes with any edit of them."""
    rows = list(
        Category.objects.filter(enabled=True)
        .order_by("display_order", "name")
        .values_list("id", "name", "prompts", "display_order", "updated_at")
    )
    # Name, prompts and order are in the stamp itself, so edits that skip updated_at (a queryset
    # update() from a shell) are seen too; the templates are in it because they make the prompts.
    stamp = (tuple(rows), tuple(prompt_templates()))
    return stamp, [CategoryRow(r[0], r[1], r[2], r[3]) for r in rows]


def _from_bytes(data, dim: int) -> np.ndarray | None:
    vector = np.frombuffer(bytes(data), dtype="<f4")
    return vector if vector.shape == (dim,) else None


def _encode_prompts(engine: Engine, texts: list[str]) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for start in range(0, len(texts), _ENCODE_CHUNK):
        chunk = texts[start : start + _ENCODE_CHUNK]
        raw = engine.embed_texts(chunk)
        out.update(zip(chunk, np.asarray(raw, dtype=np.float32), strict=True))
    return out


def category_vector(prompt_vectors: np.ndarray) -> np.ndarray:
    """Prompt ensembling: the normalised mean of the normalised prompt vectors."""
    return l2_normalize(l2_normalize(prompt_vectors).mean(axis=0))


def category_embeddings_ensure(*, engine: Engine, categories: Iterable[CategoryRow]) -> dict[int, np.ndarray]:
    """Each category's vector for ``engine``: stored rows where present, the missing ones computed in one
    batch and stored. Returns {category id: vector}."""
    categories = list(categories)
    templates = prompt_templates()
    wanted = {c.id: prompts_for(c.name, c.prompts, templates) for c in categories}
    dim = engine.dim
    have: dict[tuple[int, str], np.ndarray] = {}
    wrong_size = []
    stored = CategoryEmbedding.objects.filter(model_name=engine.name, category_id__in=list(wanted)).values_list(
        "id", "category_id", "prompt", "vector"
    )
    for row_id, category_id, prompt, data in stored:
        vector = _from_bytes(data, dim)
        if vector is None:
            wrong_size.append(row_id)
        else:
            have[(category_id, prompt)] = vector
    missing = [(cid, p) for cid, prompts in wanted.items() for p in prompts if (cid, p) not in have]
    if missing:
        texts = list(dict.fromkeys(p for _, p in missing))
        logger.info("Computing %d prompt vectors for %d categories (%s)", len(texts), len(wanted), engine.name)
        computed = _encode_prompts(engine, texts)
        with transaction.atomic():
            if wrong_size:
                CategoryEmbedding.objects.filter(id__in=wrong_size).delete()
            # Another process may be storing the same rows right now: theirs are the same vectors.
            CategoryEmbedding.objects.bulk_create(
                [
                    CategoryEmbedding(
                        category_id=cid, model_name=engine.name, prompt=p, vector=computed[p].astype("<f4").tobytes()
                    )
                    for cid, p in missing
                ],
                ignore_conflicts=True,
            )
        have.update({(cid, p): computed[p] for cid, p in missing})
    return {cid: category_vector(np.stack([have[(cid, p)] for p in prompts])) for cid, prompts in wanted.items()}


class CategoryCache:
    """Each process's copy of the enabled categories' vectors, rebuilt when the table or the model changes."""

    def __init__(self):
        self._lock = threading.Lock()
        self._matrix: CategoryMatrix | None = None

    def matrix(self, engine: Engine) -> CategoryMatrix:
        """The current matrix; raises NoCategories when no category is enabled.

        When the database fails (locked past the busy timeout, unreachable), the matrix this process
        already holds for ``engine`` answers, possibly stale; without one, DatabaseUnavailable (503).
        """
        try:
            return self._current(engine)
        except DatabaseError as exc:
            cached = self._matrix
            if cached is None or cached.model_name != engine.name:
                logger.warning("Database unavailable and no category vectors in memory yet: %s", exc)
                raise errors.DatabaseUnavailable(NO_VECTORS_WITHOUT_DATABASE) from exc
            logger.warning("Database unavailable, answering from the category vectors in memory: %s", exc)
            metrics.CATEGORY_CACHE.labels("stale").inc()
            return cached

    def _current(self, engine: Engine) -> CategoryMatrix:
        stamp, rows = _enabled_rows()
        if not rows:
            raise errors.NoCategories()
        cached = self._matrix
        if cached is not None and cached.model_name == engine.name and cached.stamp == stamp:
            metrics.CATEGORY_CACHE.labels("hit").inc()
            return cached
        with self._lock:
            cached = self._matrix
            if cached is not None and cached.model_name == engine.name and cached.stamp == stamp:
                metrics.CATEGORY_CACHE.labels("hit").inc()  # another thread rebuilt it while this one waited
                return cached
            metrics.CATEGORY_CACHE.labels("miss").inc()
            vectors = category_embeddings_ensure(engine=engine, categories=rows)
            cached = CategoryMatrix(
                model_name=engine.name,
                stamp=stamp,
                names=[r.name for r in rows],
                orders=[r.display_order for r in rows],
                vectors=np.stack([vectors[r.id] for r in rows]).astype(np.float32),
            )
            self._matrix = cached
            return cached

    def clear(self) -> None:
        with self._lock:
            self._matrix = None


category_cache = CategoryCache()


# --- Categories (the admin and the command call these) -------------------------------------------
def category_save(*, category: Category) -> Category:
    """Validate and save a category; with a model loaded, store its vectors now instead of on first use."""
    category.full_clean()
    with transaction.atomic():
        category.save()
    if runtime.ready:
        engine = runtime.engine()
        row = CategoryRow(category.id, category.name, category.prompts, category.display_order)
        category_embeddings_ensure(engine=engine, categories=[row])
        _prune_stale(category=category, model_name=engine.name)
    return category


def category_set_enabled(*, categories: QuerySet[Category], enabled: bool) -> int:
    """Enable or disable many categories at once; returns how many changed."""
    return categories.exclude(enabled=enabled).update(enabled=enabled, updated_at=timezone.now())


def _prune_stale(*, category: Category, model_name: str) -> int:
    """Drop this model's rows of prompts the category no longer has (after a rename or a prompt edit)."""
    deleted, _ = (
        CategoryEmbedding.objects.filter(category=category, model_name=model_name)
        .exclude(prompt__in=category.prompt_texts())
        .delete()
    )
    return deleted


def category_embeddings_refresh(
    *,
    engine: Engine,
    categories: Iterable[Category],
    on_category: Callable[[Category], None] | None = None,
) -> int:
    """Recompute and replace every prompt vector of ``categories`` for ``engine``; returns how many were stored."""
    stored = 0
    for category in categories:
        prompts = category.prompt_texts()
        computed = _encode_prompts(engine, prompts)
        with transaction.atomic():
            CategoryEmbedding.objects.filter(category=category, model_name=engine.name).delete()
            CategoryEmbedding.objects.bulk_create(
                CategoryEmbedding(
                    category=category, model_name=engine.name, prompt=p, vector=computed[p].astype("<f4").tobytes()
                )
                for p in prompts
            )
        stored += len(prompts)
        if on_category is not None:
            on_category(category)
    return stored


# --- The wearable answer -----------------------------------------------------------------------------
def single_image(parts: list[Part]) -> Part:
    """The one image part of a wearable request, or the error saying what is wrong with the parts."""
    images = [p for p in parts if p.is_file]
    texts = [p for p in parts if not p.is_file]
    if not images:
        if texts:
            raise errors.NoImage("Send exactly one image file part; the request has only text parts.", key=texts[0].key)
        raise errors.NoImage()
    if len(images) > 1:
        raise errors.TooManyImages(
            f"Send exactly one image file part; the request has {len(images)}.", key=images[1].key
        )
    if texts:
        raise errors.UnexpectedText(
            f"Part {texts[0].key!r} is a text: this endpoint takes one image file part and nothing else.",
            key=texts[0].key,
        )
    return images[0]


def _top_k(top_k: int | None, available: int) -> int:
    if top_k is None:
        # The default adapts to a small table; a value the client asked for is never clamped.
        return min(current().wearable.top_k, available)
    if not 1 <= top_k <= available:
        raise errors.InvalidParameter(
            f"top_k={top_k} is out of range: it must be from 1 to {available} (the enabled categories).",
            key="top_k",
        )
    return top_k


def category_probabilities(cosine: np.ndarray, *, logit_scale: float, logit_bias: float | None) -> np.ndarray:
    """The family's own zero-shot recipe: CLIP's softmax over every category of logit_scale x cosine;
    SigLIP's independent sigmoid(logit_scale x cosine + logit_bias) per category."""
    logits = logit_scale * cosine
    if logit_bias is not None:
        return 1.0 / (1.0 + np.exp(-(logits + logit_bias)))
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


def rank_categories(
    *, matrix: CategoryMatrix, image_vector: np.ndarray, logit_scale: float, logit_bias: float | None, top_k: int
) -> list[dict]:
    """The top_k categories for one normalised image vector, best first, with score and probability.

    Ranked by the true cosine (ties: display order, then name); only what is shown is rounded.
    """
    # Row by row in one summation order (a matrix-vector product may sum rows in different orders),
    # so categories with equal vectors tie exactly and their display order decides.
    cosine = (matrix.vectors.astype(np.float64) * image_vector.astype(np.float64)).sum(axis=1)
    probabilities = category_probabilities(cosine, logit_scale=logit_scale, logit_bias=logit_bias)
    order = sorted(range(len(matrix.names)), key=lambda i: (-cosine[i], matrix.orders[i], matrix.names[i]))
    return [
        {
            "category": matrix.names[i],
            "score": round(float(100.0 * cosine[i]), 2),
            "probability": round(float(probabilities[i]), 4),
        }
        for i in order[:top_k]
    ]


def wearable_predict(*, parts: list[Part], request_id: str, top_k: int | None = None, client: str = "") -> dict:
    """The whole answer of ``POST /syte_test/wearable``: rank the enabled categories, record the answer."""
    part = single_image(parts)
    engine = current_engine()
    decoded = image_of(part, engine)
    matrix = category_cache.matrix(engine)
    k = _top_k(top_k, len(matrix.names))
    out = engine.embed(images=[engine.preprocess_image(decoded.image)], client=client)
    note_embedded(images=1, texts=0, batches=out.batches)
    image_vector = l2_normalize(out.images)[0]
    ranked = rank_categories(
        matrix=matrix,
        image_vector=image_vector,
        logit_scale=engine.info.logit_scale,
        logit_bias=engine.info.logit_bias,
        top_k=k,
    )
    top = [r["category"] for r in ranked]
    try:
        # One autocommit INSERT, as requests run (no ATOMIC_REQUESTS): when it fails nothing is left
        # open, so the connection serves the next query as it is.
        Prediction.objects.create(
            request_id=request_id,
            model_name=engine.name,
            top_categories=top,
            scores=ranked,
            image_sha256=hashlib.sha256(part.data).hexdigest(),
            image=part.data if current().wearable.store_images else None,
        )
    except DatabaseError as exc:
        # The answer matters more than its record: feedback on this request_id will find no answer.
        logger.warning("Prediction of request_id %r not recorded, the database failed: %s", request_id, exc)
    return {"request_id": request_id, "model": engine.served_name, "top_categories": top, "scores": ranked}


# --- Feedback -----------------------------------------------------------------------------------------
def prediction_latest(*, request_id: str) -> Prediction:
    """The latest wearable answer with this request_id (clients may reuse ids)."""
    prediction = Prediction.objects.filter(request_id=request_id).order_by("-created_at", "-id").first()
    if prediction is None:
        raise errors.UnknownRequestId(
            f"No wearable answer has request_id {request_id!r}: send the id of a /syte_test/wearable answer.",
            key="request_id",
        )
    return prediction


def answer_was_wrong(*, top_categories: list[str], right: list[str]) -> bool:
    """Wrong when the top-1 answer is not among the categories the user says are right."""
    return not top_categories or top_categories[0].casefold() not in {c.casefold() for c in right}


def feedback_create(*, request_id: str, categories: list[str]) -> Feedback:
    """Store the categories a user says are right for an earlier wearable answer."""
    prediction = prediction_latest(request_id=request_id)
    known = {name.casefold(): name for name in Category.objects.values_list("name", flat=True)}
    right = []
    for given in categories:
        name = known.get(" ".join(given.split()).casefold())
        if name is None:
            raise errors.UnknownCategory(f"{given!r} is not a category in the table.", key=given[:200])
        if name not in right:
            right.append(name)
    wrong = answer_was_wrong(top_categories=prediction.top_categories, right=right)
    with transaction.atomic():
        feedback = Feedback.objects.create(prediction=prediction, categories=right, answer_was_wrong=wrong)
        # The latest feedback decides, so the admin can filter predictions without a join.
        Prediction.objects.filter(pk=prediction.pk).update(answer_was_wrong=wrong)
    return feedback


# --- Export (the start of an evaluation set) ----------------------------------------------------------
EXPORT_FIELDS = (
    "request_id",
    "created_at",
    "model",
    "image_sha256",
    "top_categories",
    "scores",
    "feedback_categories",
    "feedback_at",
    "answer_was_wrong",
    "feedback",
)


def prediction_export_rows(*, predictions: QuerySet[Prediction]) -> list[dict]:
    """One record per prediction with all its feedback; ``feedback_categories`` is the latest feedback's."""
    rows = []
    for p in predictions.prefetch_related("feedback").order_by("created_at", "id"):
        feedback = sorted(p.feedback.all(), key=lambda f: (f.created_at, f.id))
        latest = feedback[-1] if feedback else None
        rows.append(
            {
                "request_id": p.request_id,
                "created_at": p.created_at.isoformat(),
                "model": p.model_name,
                "image_sha256": p.image_sha256,
                "top_categories": p.top_categories,
                "scores": p.scores,
                "feedback_categories": latest.categories if latest else None,
                "feedback_at": latest.created_at.isoformat() if latest else None,
                "answer_was_wrong": p.answer_was_wrong,
                "feedback": [
                    {
                        "categories": f.categories,
                        "created_at": f.created_at.isoformat(),
                        "answer_was_wrong": f.answer_was_wrong,
                    }
                    for f in feedback
                ],
            }
        )
    return rows
