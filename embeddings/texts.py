"""What a text must be to be embedded: the one rule the API and the wearable admin both apply."""

from __future__ import annotations

from clipsite.config import current
from embeddings import errors


def check_text(text: str, *, key: str | None = None, what: str = "Text part") -> str:
    """``text`` itself when it may be embedded; else EmptyText or TextTooLong naming ``key``.

    The character limit comes first: a text of millions of letters and no space is one word, and
    must cost no more than its length to refuse (it is never split, let alone tokenised).
    """
    label = f"{what} {key!r}" if key is not None else what
    limits = current().limits
    if len(text) > limits.max_text_chars:
        raise errors.TextTooLong(f"{label} has {len(text)} characters; the limit is {limits.max_text_chars}.", key=key)
    if not text.strip():
        raise errors.EmptyText(f"{label} is empty.", key=key)
    limit = limits.max_text_words
    words = len(text.split())
    if words > limit:
        raise errors.TextTooLong(f"{label} has {words} words; the limit is {limit}.", key=key)
    return text
