"""Two real servers (scripts/start.sh -> gunicorn) on one database: an admin edit on one is seen by the other."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests

from tests.conftest import photo_bytes
from tests.server import ROOT, Server, server_env

pytestmark = [pytest.mark.server, pytest.mark.database]

PASSWORD = "wearable-staff-pw-8431"


@pytest.fixture(scope="module")
def servers(tmp_path_factory, tiny_model_dir):
    tmp = tmp_path_factory.mktemp("wearable-servers")
    env_a = server_env(tmp, tiny_model_dir)
    env_b = {**env_a, "PORT": server_env(tmp, tiny_model_dir)["PORT"]}
    a = Server(env_a, tmp / "a.log")
    started = [a]
    try:
        a.wait_ready()  # A migrates the shared database first; B then finds it current
        b = Server(env_b, tmp / "b.log")
        started.append(b)
        b.wait_ready()
        subprocess.run(
            [sys.executable, "manage.py", "createsuperuser", "--noinput"],
            cwd=ROOT,
            env={
                **os.environ,
                **env_a,
                "DJANGO_SUPERUSER_USERNAME": "staff",
                "DJANGO_SUPERUSER_PASSWORD": PASSWORD,
                "DJANGO_SUPERUSER_EMAIL": "staff@example.com",
            },
            check=True,
            capture_output=True,
            timeout=120,
        )
        yield a, b
    finally:
        for server in started:
            server.stop()


def wearable(server: Server, top_k: int) -> requests.Response:
    return requests.post(
        f"{server.url}/syte_test/wearable?top_k={top_k}",
        files={"image": ("photo.jpg", photo_bytes("chelsea.jpg"), "image/jpeg")},
        timeout=60,
    )


def csrf_of(html: str) -> str:
    return re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', html).group(1)


def admin_session(server: Server) -> requests.Session:
    session = requests.Session()
    login = f"{server.url}/admin/login/"
    page = session.get(login, timeout=30)
    response = session.post(
        login,
        data={
            "csrfmiddlewaretoken": csrf_of(page.text),
            "username": "staff",
            "password": PASSWORD,
            "next": "/admin/",
        },
        timeout=30,
    )
    assert response.ok and "/admin/login/" not in response.url, response.text[-2000:]
    return session


def edit_category(session: requests.Session, server: Server, category_id: int, **fields) -> None:
    url = f"{server.url}/admin/wearable/category/{category_id}/change/"
    page = session.get(url, timeout=30)
    assert page.ok, page.text[-2000:]
    data = {"csrfmiddlewaretoken": csrf_of(page.text), "_save": "Save", **fields}
    response = session.post(url, data=data, timeout=60, allow_redirects=False)
    assert response.status_code == 302, response.text[-3000:]


def category_ids(session: requests.Session, server: Server) -> dict[str, int]:
    html = session.get(f"{server.url}/admin/wearable/category/", timeout=30).text
    return {
        name: int(pk)
        for pk, name in re.findall(r'href="/admin/wearable/category/(\d+)/change/[^"]*">([^<]+)</a>', html)
    }


def test_an_admin_edit_on_one_server_changes_the_next_answer_of_the_other(servers):
    a, b = servers
    before = wearable(b, 20)  # B's cache is warm from here on
    assert before.status_code == 200, before.text
    top = before.json()["top_categories"]
    assert len(top) == 20

    session = admin_session(a)
    ids = category_ids(session, a)
    assert len(ids) == 20
    renamed, disabled = top[0], top[1]
    edit_category(session, a, ids[renamed], name="denim overalls", enabled="on", display_order="5", prompts="")
    edit_category(session, a, ids[disabled], name=disabled, display_order="6", prompts="")  # enabled unticked

    assert wearable(b, 20).status_code == 400  # 19 enabled now: B's range follows the table
    after = wearable(b, 19)
    assert after.status_code == 200, after.text
    names = after.json()["top_categories"]
    assert "denim overalls" in names and renamed not in names and disabled not in names
