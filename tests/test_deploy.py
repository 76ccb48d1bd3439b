"""The deployment files agree with Kubernetes' schemas and with the app: docker-compose.yml,
deploy/nginx.conf and deploy/k8s/. No cluster and no Docker: the files are read, the Jobs' commands run
here as the pods would run them, and deploy/nginx.conf runs in a real nginx where one is installed."""

from __future__ import annotations

import contextlib
import http.client
import http.server
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
from decimal import Decimal
from pathlib import Path, PurePosixPath

import dj_database_url
import kubernetes_validate
import pytest
import yaml

from clipsite import config
from tests.server import free_port

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "deploy" / "k8s"
K8S_FILES = sorted(K8S.glob("*.yaml"))
KUBERNETES_VERSION = "1.37.0"
APP_LABEL = {"app.kubernetes.io/name": "clipsite"}

# Memory of a gunicorn worker serving ViT-B/32, measured by `python manage.py bench` (README "Speed"):
# the first worker's RSS at ready counts the pages it shares; each further worker adds its private
# memory (the weights are mapped from one file); OpenVINO's resident memory grows over 10,000 requests.
# Read as MiB, the stricter reading.
FIRST_WORKER_MB = 1500
FURTHER_WORKER_MB = 700
GROWTH_PER_WORKER_MB = 170

# Variables the deployment files may set that clipsite/config.py does not declare: read by other
# programs (Hugging Face's libraries, PostgreSQL's image) or by Kubernetes' own $(VAR) expansion.
OTHER_PROGRAMS_VARIABLES = {"HF_HOME", "JOB_COMPLETION_INDEX"}
CLIPSITE_VARIABLES = {var.name for var in config.VARIABLES}
DEFAULTS = {var.name: var.default for var in config.VARIABLES}


def manifests() -> dict[str, dict]:
    """Every resource in deploy/k8s, by kind/name."""
    found = {}
    for path in K8S_FILES:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                found[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return found


def pod_specs() -> dict[str, dict]:
    return {
        name: doc["spec"]["template"]["spec"] for name, doc in manifests().items() if "template" in doc.get("spec", {})
    }


def containers(pod: dict) -> list[dict]:
    return pod.get("initContainers", []) + pod["containers"]


def server_container() -> dict:
    return pod_specs()["Deployment/clipsite"]["containers"][0]


def configmap() -> dict[str, str]:
    return manifests()["ConfigMap/clipsite-config"]["data"]


def secret() -> dict[str, str]:
    return manifests()["Secret/clipsite-secrets"]["stringData"]


def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text())


_INTERPOLATION = re.compile(r"\$\{(?P<name>\w+)(?::(?P<op>[-?])(?P<arg>[^}]*))?\}")


def interpolated(value: str) -> str:
    """``value`` as compose would give it with nothing set: defaults, and a stand-in for required ones."""

    def one(match: re.Match) -> str:
        if match["op"] == "-":
            return match["arg"]
        return f"stand-in-{match['name'].lower()}" if match["op"] == "?" else ""

    return _INTERPOLATION.sub(one, str(value)).replace("$$", "$")


def compose_environment(service: str) -> dict[str, str]:
    return {name: interpolated(value) for name, value in compose()["services"][service]["environment"].items()}


def dockerfile_port() -> int:
    return int(re.search(r"\bPORT=(\d+)", (ROOT / "Dockerfile").read_text()).group(1))


def dockerfile_healthcheck() -> dict[str, str]:
    """The Dockerfile's HEALTHCHECK options, named as compose names them: {"interval": "30s", ...}."""
    line = re.search(r"^HEALTHCHECK (.*)$", (ROOT / "Dockerfile").read_text(), re.MULTILINE).group(1)
    return {name.replace("-", "_"): value for name, value in re.findall(r"--([\w-]+)=(\S+)", line)}


def gunicorn_graceful_timeout() -> int:
    # Read, not imported: importing the gunicorn configuration sets up a server.
    text = (ROOT / "clipsite" / "gunicorn.conf.py").read_text()
    return int(re.search(r"^graceful_timeout = (\d+)$", text, re.MULTILINE).group(1))


_UNITS = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "": 1}


def quantity_bytes(value: str | int) -> int:
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()
    return int(Decimal(number) * _UNITS[unit])


def probe_port(container: dict, probe: dict) -> int:
    port = probe["httpGet"]["port"]
    return (
        next(p["containerPort"] for p in container["ports"] if p.get("name") == port) if isinstance(port, str) else port
    )


def secret_keys_given(container: dict) -> set[str]:
    """The Secret's keys a container can read: every one through envFrom, or one by one through env."""
    keys = set()
    for source in container.get("envFrom", []):
        if "secretRef" in source:
            keys |= set(manifests()[f"Secret/{source['secretRef']['name']}"]["stringData"])
    for env in container.get("env", []):
        if "secretKeyRef" in env.get("valueFrom", {}):
            keys.add(env["valueFrom"]["secretKeyRef"]["key"])
    return keys


def dockerfile_text() -> str:
    return (ROOT / "Dockerfile").read_text()


def app_written_paths() -> dict[str, PurePosixPath]:
    """Every place the app writes in its container, by why: the image's WORKDIR and HOME stand in for
    this checkout's folder and the user's home. The model folders are written by the commands that
    prepare, fetch or serve a model, which is every one but migrate."""
    from django.conf import settings

    app = PurePosixPath(re.search(r"^WORKDIR (\S+)$", dockerfile_text(), re.MULTILINE).group(1))
    home = PurePosixPath(re.search(r"--home-dir (\S+)", dockerfile_text()).group(1))
    loaded, _ = config.load(configmap(), base_dir=Path(app))  # as the pods read it; no DATABASE_URL
    kept_key = re.search(
        r'kept_secret_key\(BASE_DIR((?: / "[^"]+")+)\)', (ROOT / "clipsite" / "settings.py").read_text()
    )
    assert "TMPDIR" not in configmap()  # so Python's temporary folder is /tmp
    paths = {
        # gunicorn's heartbeat files, Prometheus' multiprocess folder (gunicorn.conf.py), Django's upload spool
        "temporary files": PurePosixPath("/tmp"),
        "collectstatic (scripts/start.sh)": app / settings.STATIC_ROOT.relative_to(settings.BASE_DIR),
        "the kept secret key": app.joinpath(*re.findall(r'"([^"]+)"', kept_key.group(1))),
        "SQLite, where DATABASE_URL is not given": PurePosixPath(dj_database_url.parse(loaded.database_url)["NAME"]),
        "OpenVINO's telemetry opt-out (~/intel)": home / "intel",
        "the models (not migrate)": PurePosixPath(loaded.runtime.models_dir),
        "HF_HOME (not migrate)": PurePosixPath(configmap()["HF_HOME"]),
    }
    rate_limit_dir = getattr(loaded.access, "rate_limit_dir", None)
    if rate_limit_dir is not None:
        paths["the rate-limit counts"] = PurePosixPath(rate_limit_dir)
    return paths


def policies() -> list[dict]:
    return [doc for name, doc in manifests().items() if name.startswith("NetworkPolicy/")]


def selects(policy: dict, labels: dict) -> bool:
    selector = policy["spec"]["podSelector"]
    assert set(selector) <= {"matchLabels"}, policy["metadata"]["name"]  # expressions are not read here
    return selector.get("matchLabels", {}).items() <= labels.items()


def rules_for(labels: dict, direction: str) -> list[dict]:
    """Every ingress or egress rule that applies to pods with ``labels`` (policies add up)."""
    kind = direction.capitalize()
    return [
        rule
        for policy in policies()
        if selects(policy, labels) and kind in policy["spec"]["policyTypes"]
        for rule in policy["spec"].get(direction, [])
    ]


def pod_template_labels() -> dict[str, dict]:
    return {
        name: doc["spec"]["template"]["metadata"]["labels"]
        for name, doc in manifests().items()
        if "template" in doc.get("spec", {})
    }


DNS_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kube-system"}},
    "podSelector": {"matchLabels": {"k8s-app": "kube-dns"}},
}
INGRESS_CONTROLLER_PEER = {
    "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "ingress-nginx"}},
    "podSelector": {"matchLabels": {"app.kubernetes.io/name": "ingress-nginx"}},
}
POSTGRESQL_PEER = {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "postgresql"}}}
# Addresses a pod allowed "the internet" must still not reach: the cluster's own private ranges and
# link-local, where clouds answer instance metadata.
NOT_PUBLIC = {"10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16"}


def egress_peer(rule: dict) -> str:
    """What an egress rule opens, in one word, or the rule itself where it is none of the known ones."""
    ports = {(port.get("protocol", "TCP"), port["port"]) for port in rule.get("ports", [])}
    database_port = dj_database_url.parse(secret()["DATABASE_URL"])["PORT"]
    if rule.get("to") == [DNS_PEER] and ports == {("UDP", 53), ("TCP", 53)}:
        return "dns"
    if rule.get("to") == [POSTGRESQL_PEER] and ports == {("TCP", database_port)}:
        return "postgresql"
    if ports == {("TCP", 443)} and len(rule.get("to", [])) == 1 and "ipBlock" in rule["to"][0]:
        block = rule["to"][0]["ipBlock"]
        if block["cidr"] == "0.0.0.0/0" and NOT_PUBLIC <= set(block.get("except", [])):
            return "public https"
    return f"unknown: {rule}"


@pytest.mark.parametrize("path", K8S_FILES, ids=lambda path: path.name)
def test_manifest_passes_strict_kubernetes_validation(path):
    # The API, not the command line: the command only warns, and exits 0, on a kind it has no schema for.
    docs = [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    assert docs, f"{path.name} holds no resource"
    errors = []
    for doc in docs:
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = ".".join(str(part) for part in exc.path)
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
        except kubernetes_validate.SchemaNotFoundError as exc:
            errors.append(exc.message)
    assert errors == []


def test_k8s_folder_has_every_resource_of_the_deployment():
    assert set(manifests()) == {
        "ConfigMap/clipsite-config",
        "Secret/clipsite-secrets",
        "PersistentVolumeClaim/clipsite-models",
        "Deployment/clipsite",
        "Service/clipsite",
        "HorizontalPodAutoscaler/clipsite",
        "PodDisruptionBudget/clipsite",
        "Job/clipsite-migrate",
        "Job/clipsite-embed",
        "Job/clipsite-fetch-model",
        "NetworkPolicy/clipsite-default-deny",
        "NetworkPolicy/clipsite-server",
        "NetworkPolicy/clipsite-migrate",
        "NetworkPolicy/clipsite-fetch-model",
    }


def test_manifests_name_no_namespace_and_carry_the_app_label():
    for name, doc in manifests().items():
        assert "namespace" not in doc["metadata"], name
        assert APP_LABEL.items() <= doc["metadata"]["labels"].items(), name
        if "template" in doc.get("spec", {}):
            assert APP_LABEL.items() <= doc["spec"]["template"]["metadata"]["labels"].items(), name


def test_every_variable_set_for_clipsite_is_one_it_reads():
    named = {"configmap.yaml": set(configmap()), "secret.yaml": set(secret())}
    for name, pod in pod_specs().items():
        named[name] = {env["name"] for container in containers(pod) for env in container.get("env", [])}
    named["docker-compose.yml clipsite"] = set(compose()["services"]["clipsite"]["environment"])
    for where, names in named.items():
        assert names - CLIPSITE_VARIABLES - OTHER_PROGRAMS_VARIABLES == set(), where
    db = set(compose()["services"]["db"]["environment"])
    assert all(name.startswith("POSTGRES_") for name in db), db


def test_configured_values_pass_clipsite_configuration_checks(tmp_path):
    for where, environ in {
        "configmap.yaml + secret.yaml": configmap() | secret(),
        "docker-compose.yml": compose_environment("clipsite"),
    }.items():
        _, problems = config.load(environ, base_dir=tmp_path)
        # The Secret's placeholder key is refused until replaced (E048): everything else passes.
        expected = ["clipsite.E048"] if "REPLACE-ME" in environ.get("DJANGO_SECRET_KEY", "") else []
        assert [p.check_id for p in problems] == expected, f"{where}: {[problem.message for problem in problems]}"


def test_database_urls_are_postgresql():
    for url in (secret()["DATABASE_URL"], compose_environment("clipsite")["DATABASE_URL"]):
        assert dj_database_url.parse(url)["ENGINE"] == "django.db.backends.postgresql", url


def test_secrets_in_the_files_are_placeholders():
    assert all("REPLACE-ME" in value for value in secret().values()), secret()
    environment = compose()["services"]["clipsite"]["environment"]
    assert environment["DJANGO_SECRET_KEY"].startswith("${DJANGO_SECRET_KEY:?")
    assert "${POSTGRES_PASSWORD:?" in environment["DATABASE_URL"]
    assert compose()["services"]["db"]["environment"]["POSTGRES_PASSWORD"].startswith("${POSTGRES_PASSWORD:?")


def test_server_probes_readiness_on_readyz_and_liveness_on_healthz():
    container = server_container()
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["startupProbe"]["httpGet"]["path"] == "/healthz"
    for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
        assert probe_port(container, container[probe]) == dockerfile_port(), probe
    # The startup probe gives a start as long as the Dockerfile's HEALTHCHECK does.
    startup = container["startupProbe"]
    start_period = int(dockerfile_healthcheck()["start_period"].removesuffix("s"))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= start_period


def test_compose_checks_readiness_as_the_dockerfile_does():
    healthcheck = compose()["services"]["clipsite"]["healthcheck"]
    assert f"http://127.0.0.1:{dockerfile_port()}/readyz" in " ".join(healthcheck["test"])
    dockerfile = dockerfile_healthcheck()
    assert {name: str(healthcheck[name]) for name in dockerfile} == dockerfile


def test_server_listens_on_the_dockerfiles_port_everywhere():
    port = dockerfile_port()
    container = server_container()
    assert [p["containerPort"] for p in container["ports"]] == [port]
    service = manifests()["Service/clipsite"]["spec"]["ports"][0]
    assert service["port"] == 80
    assert probe_port(container, {"httpGet": {"port": service["targetPort"]}}) == port
    assert compose()["services"]["clipsite"]["expose"] == [str(port)]
    assert f"clipsite:{port};" in (ROOT / "deploy" / "nginx.conf").read_text()


def test_memory_request_covers_the_measured_workers():
    workers = int(configmap()["WEB_CONCURRENCY"])
    needed_mib = FIRST_WORKER_MB + FURTHER_WORKER_MB * (workers - 1) + GROWTH_PER_WORKER_MB * workers
    resources = server_container()["resources"]
    requested = quantity_bytes(resources["requests"]["memory"])
    assert requested >= needed_mib * 2**20, f"{workers} workers need {needed_mib} MiB"
    assert quantity_bytes(resources["limits"]["memory"]) > requested


def test_cpu_request_matches_the_threads_configured():
    # The server sees the node's cores, not the pod's: its worker and thread counts must be set.
    cpus = quantity_bytes(server_container()["resources"]["requests"]["cpu"])
    data = configmap()
    assert int(data["WEB_CONCURRENCY"]) * int(data["CLIP_TORCH_THREADS"]) == cpus
    assert int(data["CLIP_SOLO_THREADS"]) == cpus


def test_shutdown_grace_outlasts_gunicorns_drain():
    graceful = gunicorn_graceful_timeout()
    pod = pod_specs()["Deployment/clipsite"]
    pre_stop = server_container()["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > graceful + pre_stop
    for service in ("clipsite", "nginx"):
        assert int(compose()["services"][service]["stop_grace_period"].removesuffix("s")) > graceful, service


def test_server_starts_with_the_start_script_after_prepare_model():
    pod = pod_specs()["Deployment/clipsite"]
    assert server_container()["command"] == ["./scripts/start.sh"]
    assert [c["command"] for c in pod["initContainers"]] == [["python", "manage.py", "prepare_model"]]


def test_model_volume_is_mounted_writable_at_clip_models_dir_wherever_it_is_used():
    models_dir = configmap()["CLIP_MODELS_DIR"]
    assert models_dir == DEFAULTS["CLIP_MODELS_DIR"]
    assert configmap()["HF_HOME"].startswith(models_dir + "/")
    for name, pod in pod_specs().items():
        volumes = {
            v["name"]
            for v in pod.get("volumes", [])
            if v.get("persistentVolumeClaim", {}).get("claimName") == "clipsite-models"
        }
        for container in containers(pod):
            for mount in container.get("volumeMounts", []):
                if mount["name"] in volumes:
                    assert mount["mountPath"] == models_dir, (name, container["name"])
                    # prepare_model's manifest is looked for only in a folder the process can write.
                    assert not mount.get("readOnly", False), (name, container["name"])
    assert manifests()["PersistentVolumeClaim/clipsite-models"]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert "clip_models:/home/models/clip_models" in compose()["services"]["clipsite"]["volumes"]


def test_every_pod_runs_as_the_images_user_by_number():
    for name, pod in pod_specs().items():
        context = pod["securityContext"]
        # The image's USER is a name: runAsNonRoot alone is refused by the kubelet.
        assert context["runAsNonRoot"] is True and context["runAsUser"] > 0, name
        for container in containers(pod):
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, (name, container["name"])
            # One image everywhere: a registry's name put in one file only would run two releases.
            assert container["image"] == server_container()["image"], (name, container["name"])


def test_service_pdb_and_hpa_target_only_the_server_pods():
    docs = manifests()
    server_labels = docs["Deployment/clipsite"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        docs["Service/clipsite"]["spec"]["selector"],
        docs["PodDisruptionBudget/clipsite"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        assert selector.items() <= server_labels.items()
        for job in (name for name in docs if name.startswith("Job/")):
            assert not selector.items() <= docs[job]["spec"]["template"]["metadata"]["labels"].items(), job
    hpa = docs["HorizontalPodAutoscaler/clipsite"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "clipsite"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert docs["PodDisruptionBudget/clipsite"]["spec"]["minAvailable"] < hpa["minReplicas"]
    assert "replicas" not in docs["Deployment/clipsite"]["spec"]  # the HPA owns the count


def test_migrate_job_runs_migrate_with_the_servers_configuration():
    job = pod_specs()["Job/clipsite-migrate"]["containers"][0]
    assert job["command"] == ["python", "manage.py", "migrate", "--noinput"]
    config_maps = [source for source in server_container()["envFrom"] if "configMapRef" in source]
    assert job["envFrom"] == config_maps
    assert secret_keys_given(job) == {"DATABASE_URL"}


def test_embed_job_runs_one_shard_per_index():
    job = manifests()["Job/clipsite-embed"]["spec"]
    container = job["template"]["spec"]["containers"][0]
    assert job["completionMode"] == "Indexed"
    assert container["command"] == ["python", "manage.py", "embed"]
    args = container["args"]
    shard = args[args.index("--shard") + 1]
    assert shard == f"$(JOB_COMPLETION_INDEX)/{job['completions']}"
    assert job["parallelism"] == job["completions"]
    assert args[args.index("--out") + 1].endswith("$(JOB_COMPLETION_INDEX).parquet")
    # $(VAR) in args expands only variables declared in the container's env; an unknown one stays as it is.
    declared = {env["name"]: env for env in container["env"]}
    assert set(re.findall(r"\$\((\w+)\)", " ".join(args))) <= set(declared)
    index = declared["JOB_COMPLETION_INDEX"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert index == "metadata.annotations['batch.kubernetes.io/job-completion-index']"
    # Kubernetes accepts backoffLimitPerIndex (and a pod failure policy) only with restartPolicy Never.
    assert "backoffLimitPerIndex" in job and job["template"]["spec"]["restartPolicy"] == "Never"


def test_every_container_has_a_read_only_root_and_a_writable_volume_wherever_the_app_writes():
    written = app_written_paths()
    for name, pod in pod_specs().items():
        writable = {v["name"] for v in pod.get("volumes", []) if set(v) & {"emptyDir", "persistentVolumeClaim"}}
        for container in containers(pod):
            where = (name, container["name"])
            assert container["securityContext"]["readOnlyRootFilesystem"] is True, where
            mounts = [
                PurePosixPath(m["mountPath"])
                for m in container.get("volumeMounts", [])
                if m["name"] in writable and not m.get("readOnly", False)
            ]
            for why, path in written.items():
                if "not migrate" in why and "migrate" in container["command"]:
                    continue
                assert any(path == mount or mount in path.parents for mount in mounts), (*where, why, str(path))


# The Secret's keys each command reads. The server signs sessions, CSRF and demo tokens and uses the
# database; migrate only the database; the others neither (a test below runs them so). Any other key
# given is one a compromised container would hold for nothing.
SECRETS_USED = {
    ("./scripts/start.sh",): {"DJANGO_SECRET_KEY", "DATABASE_URL"},
    ("python", "manage.py", "migrate", "--noinput"): {"DATABASE_URL"},
    ("python", "manage.py", "prepare_model"): set(),
    ("python", "manage.py", "embed"): set(),
    ("python", "manage.py", "fetch_model"): set(),
}


def test_each_container_gets_only_the_secrets_its_command_uses():
    for name, pod in pod_specs().items():
        assert not [v for v in pod.get("volumes", []) if set(v) & {"secret", "projected"}], name
        for container in containers(pod):
            assert secret_keys_given(container) == SECRETS_USED[tuple(container["command"])], (name, container["name"])


def test_prepare_model_embed_and_migrate_run_without_the_secrets_they_are_not_given(tmp_path, tiny_model_dir):
    from PIL import Image

    env = {key: value for key, value in os.environ.items() if key not in {"DJANGO_SECRET_KEY", "DATABASE_URL"}}
    env |= {
        "DJANGO_SETTINGS_MODULE": "clipsite.settings",
        "CLIP_MODEL": str(tiny_model_dir),
        "CLIP_MODELS_DIR": str(tmp_path / "models"),
        # Not given in the pods (the settings would use SQLite in the var emptyDir); here a database
        # that refuses every connection, so that any use of it fails the command.
        "DATABASE_URL": "postgres://clipsite:unused@127.0.0.1:9/clipsite?connect_timeout=2",
    }
    (tmp_path / "images").mkdir()
    for i in range(2):
        Image.new("RGB", (32, 32), (i * 100, 50, 50)).save(tmp_path / "images" / f"{i}.jpg")
    runs = {
        "prepare_model": ["prepare_model"],
        "embed": ["embed", str(tmp_path / "images"), "--out", str(tmp_path / "vectors.parquet")],
        "migrate (its DATABASE_URL only)": ["migrate", "--noinput"],
    }
    for what, args in runs.items():
        run_env = env | ({"DATABASE_URL": f"sqlite:///{tmp_path / 'db.sqlite3'}"} if args[0] == "migrate" else {})
        done = subprocess.run(
            [sys.executable, "manage.py", *args], cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, f"{what}:\n{done.stdout}\n{done.stderr}"
    assert (tmp_path / "vectors.parquet").is_file()


def test_network_policies_shut_every_pod_of_the_set_both_ways_first():
    deny = manifests()["NetworkPolicy/clipsite-default-deny"]["spec"]
    assert deny["podSelector"] == {"matchLabels": APP_LABEL}
    assert set(deny["policyTypes"]) == {"Ingress", "Egress"}
    assert "ingress" not in deny and "egress" not in deny
    for name, labels in pod_template_labels().items():
        assert selects(manifests()["NetworkPolicy/clipsite-default-deny"], labels), name


def test_only_the_ingress_controller_reaches_the_server_pods_and_only_on_their_port():
    for name, labels in pod_template_labels().items():
        rules = rules_for(labels, "ingress")
        if name != "Deployment/clipsite":
            assert rules == [], name  # the Jobs' pods take no connection at all
            continue
        assert [rule["from"] for rule in rules] == [[INGRESS_CONTROLLER_PEER]]
        [port] = rules[0]["ports"]
        assert port["protocol"] == "TCP"
        assert probe_port(server_container(), {"httpGet": {"port": port["port"]}}) == dockerfile_port()


def test_each_pod_may_call_only_what_it_needs():
    needs = {
        "Deployment/clipsite": {"dns", "postgresql"},  # no internet: the model comes from the volume
        "Job/clipsite-migrate": {"dns", "postgresql"},
        "Job/clipsite-fetch-model": {"dns", "public https"},  # the Hugging Face hub
        "Job/clipsite-embed": set(),  # volumes only
    }
    assert set(needs) == set(pod_template_labels())
    for name, labels in pod_template_labels().items():
        assert sorted(egress_peer(rule) for rule in rules_for(labels, "egress")) == sorted(needs[name]), name


def test_the_server_pods_do_not_fetch_the_model_the_fetch_job_does():
    job = pod_specs()["Job/clipsite-fetch-model"]["containers"][0]
    assert job["command"] == ["python", "manage.py", "fetch_model"]
    assert job["envFrom"] == [source for source in server_container()["envFrom"] if "configMapRef" in source]


def test_compose_runs_postgres_clipsite_and_nginx():
    services = compose()["services"]
    assert set(services) == {"db", "clipsite", "nginx", "redis"}
    db = services["db"]
    assert db["image"] == "postgres:15"
    assert "pg_isready" in " ".join(db["healthcheck"]["test"])
    assert db["volumes"][0].split(":")[0] in compose()["volumes"]
    assert services["clipsite"]["build"] == "."
    assert services["clipsite"]["depends_on"]["db"]["condition"] == "service_healthy"
    assert "./deploy/nginx.conf:/etc/nginx/conf.d/default.conf:ro" in services["nginx"]["volumes"]


def test_nginx_takes_the_largest_request_and_forwards_the_client():
    text = (ROOT / "deploy" / "nginx.conf").read_text()
    size, unit = re.search(r"^\s*client_max_body_size (\d+)([kmg]?);", text, re.MULTILINE).groups()
    assert int(size) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[unit] >= DEFAULTS["CLIP_MAX_REQUEST_BYTES"]
    assert re.search(r"^\s*proxy_set_header X-Forwarded-Proto \$scheme;", text, re.MULTILINE)
    assert re.search(r"^\s*proxy_set_header X-Forwarded-For \$remote_addr;", text, re.MULTILINE)
    # The API's request id header is `request_id`: nginx drops underscored headers unless told.
    assert re.search(r"^\s*underscores_in_headers on;", text, re.MULTILINE)
    read_timeout = int(re.search(r"^\s*proxy_read_timeout (\d+)s;", text, re.MULTILINE).group(1))
    assert read_timeout > DEFAULTS["CLIP_REQUEST_TIMEOUT"]


def test_compose_publishes_nginx_on_loopback_by_default():
    published = {}
    for entry in compose()["services"]["nginx"]["ports"]:
        host, _, container_port = interpolated(entry).rpartition(":")
        published[int(container_port)] = host
    # The public server (80) and the operators' server (8082, deploy/nginx.conf): the host's loopback only.
    assert published == {80: "127.0.0.1:8080", 8082: "127.0.0.1:8082"}
    assert [entry.split(":-")[0] for entry in compose()["services"]["nginx"]["ports"]] == [
        "${CLIPSITE_PUBLISH",
        "${CLIPSITE_OPS_PUBLISH",
    ]
    for service in set(compose()["services"]) - {"nginx"}:
        assert "ports" not in compose()["services"][service], service


def test_nginx_sets_every_client_timeout_and_both_limits():
    text = (ROOT / "deploy" / "nginx.conf").read_text()

    def seconds(directive: str) -> int:
        return int(re.search(rf"^\s*{directive} (\d+)s;", text, re.MULTILINE).group(1))

    assert seconds("client_header_timeout") <= 10
    for directive in ("client_body_timeout", "send_timeout", "keepalive_timeout"):
        assert 0 < seconds(directive) <= 60, directive
    assert re.search(r"^limit_req zone=\w+ burst=\d+ nodelay;", text, re.MULTILINE)
    assert re.search(r"^limit_conn \w+ \d+;", text, re.MULTILINE)
    # Per client address, in zones of their own.
    assert re.search(r"^limit_req_zone \$binary_remote_addr ", text, re.MULTILINE)
    assert re.search(r"^limit_conn_zone \$binary_remote_addr ", text, re.MULTILINE)


# deploy/nginx.conf in a real nginx. Only what the machine decides is rewritten: the listening addresses
# (loopback, free ports) and the upstream (a stand-in server here, for the compose service's name).
# realip lets a test speak from any client address: nginx takes it from X-Test-Client, as it would from a
# trusted proxy's header.
NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.path.exists(p)), None)
needs_nginx = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (scripts/setup.sh --dev installs it)")


class Upstream(http.server.ThreadingHTTPServer):
    """Stands in for clipsite: answers every request with what it received; /slow waits to be released."""

    daemon_threads = True

    def __init__(self):
        self.seen: list[str] = []
        self.release = threading.Event()
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                outer.seen.append(self.path)
                if self.path.startswith("/slow"):
                    outer.release.wait(30)
                body = json.dumps({"path": self.path}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.fixture(scope="module")
def nginx(tmp_path_factory):
    if NGINX is None:
        pytest.skip("nginx is not installed")
    tmp = tmp_path_factory.mktemp("nginx")
    upstream = Upstream()
    threading.Thread(target=upstream.serve_forever, daemon=True).start()
    public, operators = free_port(), free_port()
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    for old, new in {
        "listen 80;": f"listen 127.0.0.1:{public};",
        "listen 8082;": f"listen 127.0.0.1:{operators};",
        "clipsite:8081;": f"127.0.0.1:{upstream.server_address[1]};",
    }.items():
        assert conf.count(old) == (2 if old.startswith("clipsite") else 1), old
        conf = conf.replace(old, new)
    (tmp / "clipsite.conf").write_text(conf)
    temp_paths = " ".join(
        f"{name}_temp_path {tmp / name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (tmp / "nginx.conf").write_text(
        ("user root;\n" if os.geteuid() == 0 else "")
        + f"pid {tmp / 'nginx.pid'};\nerror_log {tmp / 'error.log'};\nevents {{}}\n"
        + f"http {{\n access_log off;\n {temp_paths}\n"
        + " set_real_ip_from 127.0.0.1;\n real_ip_header X-Test-Client;\n"
        + f" include {tmp / 'clipsite.conf'};\n}}\n"
    )
    command = [NGINX, "-p", str(tmp), "-e", str(tmp / "error.log"), "-c", str(tmp / "nginx.conf")]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    proc = subprocess.Popen([*command, "-g", "daemon off;"], stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while True:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", public), timeout=1):
            break
        assert time.monotonic() < deadline and proc.poll() is None, (tmp / "error.log").read_text()
        time.sleep(0.05)
    yield {"public": public, "operators": operators, "upstream": upstream}
    upstream.release.set()
    proc.terminate()
    proc.wait(10)
    upstream.shutdown()


def get(port: int, path: str, client: str = "127.0.0.1") -> tuple[int, dict, bytes]:
    """``path`` sent as it is (no normalising), from the client address ``client``."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"X-Test-Client": client})
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


@needs_nginx
def test_nginx_accepts_the_config(nginx):
    # The fixture ran `nginx -t` on deploy/nginx.conf and started it.
    assert get(nginx["public"], "/readyz", "192.0.2.1")[0] == 200


@needs_nginx
@pytest.mark.parametrize(
    "path",
    [
        "/admin/",
        "/admin",
        "/admin/login/?next=/admin/",
        "/%61dmin/",
        "//admin/",
        "/static/../admin/",
        "/metrics",
        "//metrics",
        "/%6detrics",
        "/metrics?x=1",
    ],
)
def test_nginx_public_port_has_no_admin_and_no_metrics(nginx, path):
    before = len(nginx["upstream"].seen)
    status, _, _ = get(nginx["public"], path, "192.0.2.2")
    assert status == 404
    assert len(nginx["upstream"].seen) == before  # refused by nginx: clipsite never saw it


@needs_nginx
def test_nginx_public_port_serves_everything_else(nginx):
    for path in ("/", "/readyz", "/static/admin/css/base.css", "/api/docs/", "/metricsx"):
        status, _, body = get(nginx["public"], path, "192.0.2.3")
        assert status == 200 and json.loads(body)["path"] == path, path


@needs_nginx
@pytest.mark.parametrize("client", ["127.0.0.1", "10.1.2.3", "172.18.0.1", "192.168.1.20"])
def test_nginx_operators_port_serves_admin_and_metrics_to_private_addresses(nginx, client):
    for path in ("/metrics", "/admin/login/"):
        status, _, body = get(nginx["operators"], path, client)
        assert status == 200 and json.loads(body)["path"] == path, (client, path)


@needs_nginx
@pytest.mark.parametrize("client", ["192.0.2.4", "8.8.8.8", "172.32.0.1"])
def test_nginx_operators_port_refuses_public_addresses(nginx, client):
    for path in ("/metrics", "/admin/", "/"):
        assert get(nginx["operators"], path, client)[0] == 403, (client, path)


@needs_nginx
def test_nginx_throttles_requests_per_address_with_the_apis_error_shape(nginx):
    started = time.monotonic()
    answers = []
    while len(answers) < 400 and (not answers or answers[-1][0] == 200):  # until the first refusal
        answers.append(get(nginx["public"], "/readyz", "198.51.100.7"))
    elapsed = time.monotonic() - started
    statuses = [status for status, _, _ in answers]
    # burst=40 pass at once, then 20 a second.
    assert statuses[:41] == [200] * 41
    assert statuses.count(200) <= 41 + 20 * elapsed + 1
    status, headers, body = next(answer for answer in answers if answer[0] != 200)
    assert status == 429 and headers["Retry-After"] == "1"
    assert json.loads(body)["error"]["code"] == "throttled"
    # Another address has a count of its own.
    assert get(nginx["public"], "/readyz", "198.51.100.8")[0] == 200


@needs_nginx
def test_nginx_limits_connections_per_address(nginx):
    limit = int(re.search(r"^limit_conn \w+ (\d+);", (ROOT / "deploy" / "nginx.conf").read_text(), re.MULTILINE)[1])
    upstream = nginx["upstream"]
    upstream.release.clear()
    results: list[int] = []
    threads = [
        threading.Thread(target=lambda: results.append(get(nginx["public"], "/slow", "203.0.113.9")[0]))
        for _ in range(limit)
    ]
    try:
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 10
        while sum(path == "/slow" for path in upstream.seen) < limit and time.monotonic() < deadline:
            time.sleep(0.02)
        status, _, body = get(nginx["public"], "/readyz", "203.0.113.9")
        assert status == 429 and json.loads(body)["error"]["code"] == "throttled"
        assert get(nginx["public"], "/readyz", "203.0.113.10")[0] == 200  # another address is not held up
    finally:
        upstream.release.set()
        for thread in threads:
            thread.join(15)
    assert results == [200] * limit
