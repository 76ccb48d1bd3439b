"""The one frozen configuration: defaults written once, every bad value its own check id and hint."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from django.core import checks

from clipsite.config import VARIABLES, Config, load

BASE = Path("/srv/clipsite")
BAD_VALUES = {
    "_bool": "maybe",
    "_int": "lots",
    "_float": "soon",
    "_choice": "quantum",
}


def test_the_defaults_need_no_environment():
    config, problems = load({}, base_dir=BASE)
    assert problems == []
    assert config.limits.max_parts == 64 and config.limits.max_text_words == 50
    assert (config.runtime.backend, config.runtime.dtype) == ("auto", "auto") and config.runtime.max_batch == 32
    assert config.server.port == 8081 and config.server.workers == config.server.cores
    assert config.database_url == "sqlite:////srv/clipsite/var/db.sqlite3"
    assert config.wearable.prompt_templates[0] == "a photo of a {}."


def test_the_configuration_is_frozen():
    config, _ = load({}, base_dir=BASE)
    assert isinstance(config, Config)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.limits.max_parts = 3


def test_every_variable_has_its_own_check_id_and_a_hint():
    ids = [var.check_id for var in VARIABLES]
    assert len(ids) == len(set(ids))
    assert all(var.hint for var in VARIABLES)


@pytest.mark.parametrize("var", [v for v in VARIABLES if v.parse.__name__ in BAD_VALUES], ids=lambda v: v.name)
def test_a_bad_value_is_reported_with_the_variables_own_id_and_the_default_stands_in(var):
    config, problems = load({var.name: BAD_VALUES[var.parse.__name__]}, base_dir=BASE)
    assert [(p.variable, p.check_id) for p in problems] == [(var.name, var.check_id)]
    assert var.name in problems[0].message and problems[0].hint
    assert config == load({}, base_dir=BASE)[0]


@pytest.mark.parametrize(
    "env, variable, check_id",
    [
        ({"CLIP_MAX_PARTS": "0"}, "CLIP_MAX_PARTS", "clipsite.E027"),
        ({"PORT": "70000"}, "PORT", "clipsite.E007"),
        ({"CLIP_REQUEST_TIMEOUT": "nan"}, "CLIP_REQUEST_TIMEOUT", "clipsite.E022"),
        ({"CLIP_DTYPE": "int8", "CLIP_BACKEND": "torch"}, "CLIP_DTYPE", "clipsite.E031"),
        ({"CLIP_DTYPE": "int8", "CLIP_BACKEND": "openvino"}, "CLIP_DTYPE", "clipsite.E031"),
        ({"CLIP_QUANTIZE": "int8", "CLIP_RUNTIME": "torch"}, "CLIP_DTYPE", "clipsite.E031"),
        ({"CLIP_DTYPE": "int8", "CLIP_DEVICE": "cuda"}, "CLIP_DTYPE", "clipsite.E032"),
        ({"CLIP_BACKEND": "onnx", "CLIP_DEVICE": "cuda"}, "CLIP_BACKEND", "clipsite.E033"),
        ({"CLIP_BACKEND": "openvino", "CLIP_DEVICE": "cuda"}, "CLIP_BACKEND", "clipsite.E033"),
        ({"CLIP_DTYPE": "bfloat16", "CLIP_BACKEND": "onnx"}, "CLIP_DTYPE", "clipsite.E038"),
        ({"CLIP_DTYPE": "float16"}, "CLIP_DTYPE", "clipsite.E039"),  # the default device is the CPU
        ({"DJANGO_SECRET_KEY": "REPLACE-ME-with-a-long-random-string"}, "DJANGO_SECRET_KEY", "clipsite.E048"),
        (
            {"CLIP_WORKER_MEMORY_MB": "64", "CLIP_MAX_REQUEST_BYTES": "20000000"},
            "CLIP_WORKER_MEMORY_MB",
            "clipsite.E068",
        ),
        ({"WEB_HEADER_TIMEOUT": "0"}, "WEB_HEADER_TIMEOUT", "clipsite.E060"),
        ({"CLIP_DTYPE": "float16", "CLIP_DEVICE": "auto", "CLIP_BACKEND": "openvino"}, "CLIP_DTYPE", "clipsite.E039"),
        ({"WEARABLE_PROMPT_TEMPLATES": " | "}, "WEARABLE_PROMPT_TEMPLATES", "wearable.E001"),
        (
            {"WEARABLE_PROMPT_TEMPLATES": "a photo of a {}.|a photo of clothing."},
            "WEARABLE_PROMPT_TEMPLATES",
            "wearable.E002",
        ),
    ],
)
def test_out_of_range_and_conflicting_values(env, variable, check_id):
    _, problems = load(env, base_dir=BASE)
    assert [(p.variable, p.check_id) for p in problems] == [(variable, check_id)]


def test_values_are_parsed_and_derived_once():
    config, problems = load(
        {
            "CLIP_MAX_PARTS": " 1_000 ",
            "DJANGO_ALLOWED_HOSTS": "a.example, b.example",
            "WEB_CONCURRENCY": "4",
            "CLIP_BACKEND": "OpenVINO",
            "CLIP_DTYPE": "bfloat16",
            "WEARABLE_PROMPT_TEMPLATES": "{}|a photo of a {}",
            "LOG_LEVEL": "warning",
        },
        base_dir=BASE,
    )
    assert problems == []
    assert config.limits.max_parts == 1000 and config.allowed_hosts == ("a.example", "b.example")
    assert (config.runtime.backend, config.runtime.dtype) == ("openvino", "bfloat16")
    assert config.log_level == "WARNING"
    assert config.wearable.prompt_templates == ("{}", "a photo of a {}")
    assert config.runtime.text_threads == max(1, config.server.cores // 4)
    assert config.runtime.image_threads == config.server.cores


def test_the_old_names_still_choose_when_the_new_ones_are_unset():
    old = {"CLIP_RUNTIME": "onnx", "CLIP_QUANTIZE": "int8"}
    assert (load(old, base_dir=BASE)[0].runtime.backend, load(old, base_dir=BASE)[0].runtime.dtype) == ("onnx", "int8")
    both = load(old | {"CLIP_BACKEND": "auto", "CLIP_DTYPE": "bfloat16"}, base_dir=BASE)[0].runtime
    assert (both.backend, both.dtype) == ("auto", "bfloat16")
    torch_only = load({"CLIP_RUNTIME": "torch"}, base_dir=BASE)[0].runtime
    assert (torch_only.backend, torch_only.dtype) == ("torch", "float32")  # what it meant: float32


def test_the_system_check_reports_each_problem_with_its_id(settings):
    _, problems = load({"CLIP_MAX_BATCH": "many", "WEB_THREADS": "0"}, base_dir=BASE)
    settings.CLIPSITE_PROBLEMS = problems
    errors = [m for m in checks.run_checks() if m.id.startswith("clipsite.")]
    assert sorted((e.id, e.obj) for e in errors) == [
        ("clipsite.E009", "WEB_THREADS"),
        ("clipsite.E018", "CLIP_MAX_BATCH"),
    ]
    assert all(e.hint for e in errors)


def test_nothing_but_settings_reads_the_environment():
    root = Path(__file__).resolve().parent.parent
    readers = []
    for path in (
        list((root / "embeddings").rglob("*.py"))
        + list((root / "wearable").rglob("*.py"))
        + list((root / "clipsite").glob("*.py"))
    ):
        text = path.read_text()
        if "os.environ" in text or "os.getenv" in text:
            readers.append(path.relative_to(root).as_posix())
    # wsgi.py only sets HF_HUB_OFFLINE, gunicorn.conf.py PROMETHEUS_MULTIPROC_DIR and HF_HUB_OFFLINE, for the workers.
    assert sorted(readers) == ["clipsite/gunicorn.conf.py", "clipsite/settings.py", "clipsite/wsgi.py"]


def test_the_kept_secret_key_is_made_once_private_and_shared(tmp_path):
    import os
    import threading

    from clipsite.config import kept_secret_key

    path = tmp_path / "var" / "secret_key"
    keys = []
    threads = [threading.Thread(target=lambda: keys.append(kept_secret_key(path))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(keys)) == 1 and len(keys[0]) >= 50
    assert (os.stat(path).st_mode & 0o777) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret_key"]  # no temporary file left


def test_no_writable_place_for_the_key_is_a_configuration_error(tmp_path):
    from clipsite.config import NO_SECRET_KEY, kept_secret_key

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    assert kept_secret_key(blocked / "secret_key") is None
    assert NO_SECRET_KEY.check_id == "clipsite.E037" and "DJANGO_SECRET_KEY" in NO_SECRET_KEY.hint


def test_check_deploy_is_clean_with_the_production_settings(tmp_path):
    """What README's "Running in production" sets: a key, the public host, HTTPS through a proxy."""
    import os
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "clipsite.settings",
        "DJANGO_SECRET_KEY": "k" * 20 + "-a-long-random-production-key-" + "x" * 30,
        "DJANGO_ALLOWED_HOSTS": "clip.example.com",
        "DJANGO_CSRF_TRUSTED_ORIGINS": "https://clip.example.com",
        "DJANGO_HTTPS": "true",
        "DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}",
    }
    result = subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no issues" in result.stdout


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        ({"cpu.max": "max 100000\n"}, None),  # no limit: the cores it may run on
        ({"cpu.max": "100000 100000\n"}, 1),  # a pod limited to 1 CPU on a bigger node
        ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs: rounded up, a thread's worth of time remains
        ({"cpu/cpu.cfs_quota_us": "50000", "cpu/cpu.cfs_period_us": "100000"}, 1),  # cgroup v1
        ({"cpu/cpu.cfs_quota_us": "-1", "cpu/cpu.cfs_period_us": "100000"}, None),
        ({"cpu.max": "garbage"}, None),
    ],
)
def test_cores_follow_the_cgroups_cpu_quota(tmp_path, files, expected):
    from clipsite.config import cpu_cores

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    allowed = cpu_cores(tmp_path / "nowhere")
    assert cpu_cores(tmp_path) == (min(allowed, expected) if expected else allowed)
