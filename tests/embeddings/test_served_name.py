"""The served model name: what answers, /v1/models and errors call the model. A hub id as it is, a folder
by its base name, a test model by its own name, or CLIP_SERVED_MODEL_NAME; never a path of this machine."""

from __future__ import annotations

import io
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

from clipsite.config import load
from embeddings.runtime import loading, testmodel
from embeddings.runtime.loading import default_served_name, resolve_model_source, served_name
from embeddings.runtime.prepare import prepare
from embeddings.runtime.state import runtime
from tests.conftest import gradient_image, image_bytes, override, runtime_settings


@pytest.fixture(scope="module")
def folder_model(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny model as an operator's own folder (not marked as a test model), prepared on torch."""
    folder = tmp_path_factory.mktemp("volume") / "models" / "my-clip"
    shutil.copytree(tiny_model_dir, folder, ignore=shutil.ignore_patterns("clipsite-prepared"))
    (folder / "model-clip" / testmodel.MARKER).unlink()
    prepare(runtime_settings(folder, backend="torch", dtype="float32"))
    return folder


@pytest.fixture
def serving(folder_model):
    """Load the folder's model in the process runtime with ``served_model_name`` (closed after)."""

    def load_it(served_model_name: str = ""):
        runtime.close()
        settings = runtime_settings(folder_model, backend="torch", dtype="float32")
        return runtime.load(replace(settings, served_model_name=served_model_name))

    yield load_it
    runtime.close()


def upload(name: str = "a.png"):
    f = io.BytesIO(image_bytes(gradient_image(seed=1)))
    f.name = name
    return f


def names_in_answers(client) -> tuple[set[str], str]:
    """The names the answers give the model (one, if all agree), and the whole text of those answers."""
    multipart = client.post("/syte_test/embeddings", data={"t": "a cat", "i": upload()})
    openai = client.post("/v1/embeddings", data={"input": "a cat"}, content_type="application/json")
    models, ready = client.get("/v1/models"), client.get("/readyz")
    for response in (multipart, openai, models, ready):
        assert response.status_code == 200, response.content
    (listed,) = models.json()["data"]  # the one served model
    names = {multipart.json()["model"], openai.json()["model"], listed["id"], ready.json()["model"]}
    return names, b"".join(r.content for r in (multipart, openai, models, ready)).decode()


def test_a_folder_is_served_under_its_base_name_never_its_path(client, serving, folder_model):
    serving()
    names, text = names_in_answers(client)
    assert names == {"my-clip"} and str(folder_model.parent) not in text
    assert client.get("/v1/models/my-clip").json()["id"] == "my-clip"
    for asked in (str(folder_model), "other"):  # the path is no longer a name of the model
        by_id = client.get(f"/v1/models/{asked}")
        named = client.post("/v1/embeddings", data={"model": asked, "input": "x"}, content_type="application/json")
        for response in (by_id, named):
            assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"
            assert "'my-clip'" in response.json()["error"]["message"]
            assert str(folder_model.parent) not in response.json()["error"]["message"].replace(asked, "")
    accepted = client.post("/v1/embeddings", data={"model": "my-clip", "input": "x"}, content_type="application/json")
    assert accepted.status_code == 200 and accepted.json()["model"] == "my-clip"


@pytest.mark.django_db
def test_the_wearable_answer_and_the_details_name_it_too(client, admin_client, serving, folder_model):
    serving()
    wearable = client.post("/syte_test/wearable", data={"image": upload()})
    assert wearable.status_code == 200 and wearable.json()["model"] == "my-clip"
    details = admin_client.get("/readyz?verbose=1").json()
    assert details["model"] == "my-clip" and details["source"] == str(folder_model)  # the path: staff only


def test_clip_served_model_name_overrides_the_default(client, serving, folder_model):
    serving("acme/clip-prod:v2")
    assert names_in_answers(client)[0] == {"acme/clip-prod:v2"}
    assert client.get("/v1/models/acme/clip-prod:v2").status_code == 200
    body = {"model": "acme/clip-prod:v2", "input": "x"}
    assert client.post("/v1/embeddings", data=body, content_type="application/json").status_code == 200
    assert client.get("/v1/models/my-clip").status_code == 404


def test_the_default_name_of_each_way_of_naming_a_model(tmp_path, tiny_model_dir, folder_model, monkeypatch):
    cache = loading.hub_cache_dir(tmp_path, "openai/clip-vit-base-patch32")
    shutil.copytree(folder_model, cache, ignore=shutil.ignore_patterns("clipsite-prepared"))
    hub = resolve_model_source("openai/clip-vit-base-patch32", tmp_path)
    assert served_name(hub) == "openai/clip-vit-base-patch32"  # a hub id as it is
    assert served_name(resolve_model_source(str(folder_model) + "/", tmp_path)) == "my-clip"
    monkeypatch.chdir(folder_model)
    assert served_name(resolve_model_source(".", tmp_path)) == "my-clip"  # a relative folder: its own name
    assert served_name(resolve_model_source("", folder_model)) == "my-clip"  # the layout under CLIP_MODELS_DIR
    test_model = resolve_model_source(str(tiny_model_dir), tmp_path)
    assert served_name(test_model) == test_model.name and str(tiny_model_dir) not in test_model.name
    assert served_name(hub, "mine") == served_name(test_model, "mine") == "mine"
    assert default_served_name("openai/clip-vit-base-patch32") == "openai/clip-vit-base-patch32"


def test_the_demo_page_names_a_loading_folder_by_its_base_name(settings, folder_model, monkeypatch):
    from clipsite.demo import model_status

    monkeypatch.setattr(runtime, "_engine", None)
    monkeypatch.setattr(runtime, "status", "loading")
    override(settings, runtime={"model": str(folder_model)})
    assert model_status() == {"state": "loading", "name": "my-clip"}
    override(settings, runtime={"served_model_name": "clip-prod"})
    assert model_status()["name"] == "clip-prod"


@pytest.mark.parametrize("raw", ["has space", "../up", "/abs/path", "x" * 129, "tab\there", "é"])
def test_a_bad_served_model_name_has_its_own_check(tmp_path, raw):
    config, problems = load({"CLIP_SERVED_MODEL_NAME": raw}, base_dir=tmp_path)
    assert [(p.variable, p.check_id) for p in problems] == [("CLIP_SERVED_MODEL_NAME", "clipsite.E066")]
    assert config.runtime.served_model_name == ""


def test_a_served_model_name_is_read_as_given(tmp_path):
    config, problems = load({"CLIP_SERVED_MODEL_NAME": "acme/clip-vit-b-32:v2"}, base_dir=tmp_path)
    assert not problems and config.runtime.served_model_name == "acme/clip-vit-b-32:v2"
    assert load({}, base_dir=tmp_path)[0].runtime.served_model_name == ""
