"""The wearable categories staff edit, the cache of their text vectors, and the answers with feedback."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import models
from django.db.models.functions import Lower

from clipsite.config import current
from embeddings.errors import ApiError
from embeddings.texts import check_text

NAME_MAX_CHARS = 100


def prompt_lines(prompts: str) -> list[str]:
    """A category's own prompts: one a line, blank lines ignored."""
    return [line.strip() for line in prompts.splitlines() if line.strip()]


def prompts_for(name: str, prompts: str, templates: list[str]) -> list[str]:
    """The texts whose vectors make a category's vector: its own prompts, else the templates.

    ``{}`` stands for the category's name, in a template and in a category's own prompt alike.
    """
    lines = prompt_lines(prompts) or templates or ["{}"]
    return list(dict.fromkeys(line.replace("{}", name) for line in lines))


class Category(models.Model):
    """A wearable the endpoint can answer with. Every edit is seen by every process on its next request."""

    name = models.CharField(max_length=NAME_MAX_CHARS, unique=True, help_text="What the API answers, e.g. jeans.")
    enabled = models.BooleanField(default=True, help_text="Only enabled categories are ranked.")
    display_order = models.PositiveIntegerField(default=0, help_text="Breaks ties between equal scores.")
    prompts = models.TextField(
        blank=True,
        help_text="Own prompts, one a line ({} is the name); empty: WEARABLE_PROMPT_TEMPLATES.",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["display_order", "name"]
        verbose_name_plural = "categories"
        constraints = [
            models.CheckConstraint(condition=~models.Q(name=""), name="wearable_category_name_not_empty"),
            models.UniqueConstraint(
                Lower("name"),
                name="wearable_category_name_unique_ci",
                violation_error_message="A category with this name (in any case) exists.",
            ),
        ]

    def __str__(self) -> str:
        return self.name

    def clean(self) -> None:
        self.name = " ".join((self.name or "").split())
        if not self.name:
            raise ValidationError({"name": "The name must not be empty."})
        for line in prompt_lines(self.prompts or ""):
            try:
                check_text(line.replace("{}", self.name), key=line[:60], what="The prompt")
            except ApiError as exc:
                raise ValidationError({"prompts": exc.message}) from exc
        self.prompts = "\n".join(prompt_lines(self.prompts or ""))

    def prompt_texts(self, templates: list[str] | None = None) -> list[str]:
        templates = list(current().wearable.prompt_templates) if templates is None else templates
        return prompts_for(self.name, self.prompts, templates)


class CategoryEmbedding(models.Model):
    """The raw text vector of one prompt of one category, for one model (vectors of models never mix)."""

    category = models.ForeignKey(Category, on_delete=models.CASCADE, related_name="embeddings")
    model_name = models.CharField(max_length=300)
    prompt = models.TextField()
    vector = models.BinaryField(help_text="Little-endian float32, the model's raw text projection.")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        constraints = [
            models.UniqueConstraint(fields=["category", "model_name", "prompt"], name="wearable_embedding_unique"),
        ]
        indexes = [models.Index(fields=["model_name", "category"])]

    def __str__(self) -> str:
        return f"{self.category_id} / {self.model_name} / {self.prompt}"


class Prediction(models.Model):
    """One answer of the wearable endpoint, kept so feedback can refer to it by request_id."""

    request_id = models.CharField(max_length=128, db_index=True)
    model_name = models.CharField(max_length=300)
    top_categories = models.JSONField(help_text="Names, best first.")
    scores = models.JSONField(help_text='[{"category", "score", "probability"}, ...], as answered.')
    image_sha256 = models.CharField(max_length=64, db_index=True)
    image = models.BinaryField(null=True, blank=True, help_text="Kept only with WEARABLE_STORE_IMAGES.")
    # Set by the latest feedback: null while there is none (see Feedback).
    answer_was_wrong = models.BooleanField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]

    def __str__(self) -> str:
        return f"{self.request_id}: {', '.join(self.top_categories)}"


class Feedback(models.Model):
    """The categories a user says are right for a prediction; the answer was wrong when its top-1 is not among them."""

    prediction = models.ForeignKey(Prediction, on_delete=models.CASCADE, related_name="feedback")
    categories = models.JSONField(help_text="Names of the categories the user says are right.")
    answer_was_wrong = models.BooleanField()
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name_plural = "feedback"

    def __str__(self) -> str:
        return f"{self.prediction.request_id}: {', '.join(self.categories)}"
