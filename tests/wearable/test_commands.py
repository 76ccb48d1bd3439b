"""manage.py refresh_category_embeddings: recompute every category's vectors for the configured model."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import numpy as np
import pytest
from django.core.management import CommandError, call_command

from tests.conftest import MODELS, assert_same_vectors, override
from tests.server import ROOT
from wearable.models import Category, CategoryEmbedding

pytestmark = pytest.mark.django_db


@pytest.fixture
def configured(settings, tiny_model_dir, clip):
    override(settings, runtime={"model": str(tiny_model_dir), "models_dir": MODELS})
    return clip


def run(*args) -> tuple[str, str]:
    out, err = io.StringIO(), io.StringIO()
    call_command("refresh_category_embeddings", *args, stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_refresh_stores_every_prompt_vector_with_a_progress_bar(configured):
    Category.objects.filter(name="hat").update(enabled=False, prompts="a hat\na cap")
    out, err = run()
    assert "Stored 59 prompt vectors for 20 categories" in out  # 19 x 3 templates + 2 own prompts
    assert "20/20" in err  # tqdm's bar
    rows = CategoryEmbedding.objects.filter(model_name=configured.name)
    assert rows.count() == 59
    hat = rows.filter(category__name="hat").order_by("prompt")
    stored = np.stack([np.frombuffer(bytes(row.vector), "<f4") for row in hat])
    assert_same_vectors(stored, configured.embed_texts(["a cap", "a hat"]))


def test_refresh_replaces_stale_and_wrong_rows(configured):
    jeans = Category.objects.get(name="jeans")
    CategoryEmbedding.objects.create(
        category=jeans, model_name=configured.name, prompt="an old prompt", vector=b"\0" * 4 * configured.dim
    )
    run("--enabled-only")
    prompts = set(CategoryEmbedding.objects.filter(category=jeans).values_list("prompt", flat=True))
    assert prompts == set(jeans.prompt_texts())


def test_refresh_can_purge_other_models(configured):
    CategoryEmbedding.objects.create(
        category=Category.objects.first(), model_name="old-model", prompt="x", vector=b"\0" * 16
    )
    out, _ = run("--purge-other-models")
    assert "Deleted 1 vectors of other models." in out
    assert not CategoryEmbedding.objects.exclude(model_name=configured.name).exists()


def test_refresh_without_categories_is_a_command_error(configured):
    Category.objects.all().delete()
    with pytest.raises(CommandError, match="no category"):
        run()


def test_a_model_that_cannot_load_is_a_command_error(tmp_path):
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "clipsite.settings",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
        "CLIP_MODEL": str(tmp_path / "no-such-model"),
        "CLIP_MODELS_DIR": str(tmp_path),
    }
    done = subprocess.run(
        [sys.executable, "manage.py", "refresh_category_embeddings"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1
    assert "CommandError: cannot load the model" in done.stderr
