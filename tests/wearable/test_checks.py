"""System checks of the wearable settings."""

from __future__ import annotations

from wearable.checks import check_prompt_templates


def test_default_templates_pass(settings):
    assert check_prompt_templates() == []


def test_a_template_without_the_name_is_an_error(settings):
    settings.WEARABLE_PROMPT_TEMPLATES = ["a photo of a {}.", "a photo of clothing."]
    (error,) = check_prompt_templates()
    assert error.id == "wearable.E002" and "a photo of clothing." in error.msg


def test_no_template_is_an_error(settings):
    settings.WEARABLE_PROMPT_TEMPLATES = []
    assert [e.id for e in check_prompt_templates()] == ["wearable.E001"]
