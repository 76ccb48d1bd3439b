"""Forms for DRF's browsable API page only: the views read the request's parts themselves."""

from __future__ import annotations

from rest_framework import serializers


class ImageUploadForm(serializers.Serializer):
    """The HTML form under an image endpoint on DRF's page: one image file."""

    image = serializers.FileField(
        required=False, allow_empty_file=True, help_text="A JPEG or PNG (or WebP, GIF, BMP, TIFF)."
    )


class EmbeddingsForm(ImageUploadForm):
    """The HTML form under ``/syte_test/embeddings``: an image, a text, or both (sent as ``image`` and ``text``)."""

    text = serializers.CharField(
        required=False, allow_blank=True, help_text="Any text; with an image, their similarity comes back too."
    )
