"""The deployment files agree with Kubernetes' schemas and with the app: docker-compose.yml,
deploy/nginx.conf and deploy/k8s/. Reads files only: no cluster, no Docker, no server."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import dj_database_url
import kubernetes_validate
import pytest
import yaml

from clipsite import config

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
        for job in ("Job/clipsite-migrate", "Job/clipsite-embed"):
            assert not selector.items() <= docs[job]["spec"]["template"]["metadata"]["labels"].items(), job
    hpa = docs["HorizontalPodAutoscaler/clipsite"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "clipsite"}
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (2, 10)
    assert docs["PodDisruptionBudget/clipsite"]["spec"]["minAvailable"] < hpa["minReplicas"]
    assert "replicas" not in docs["Deployment/clipsite"]["spec"]  # the HPA owns the count


def test_migrate_job_runs_migrate_with_the_servers_configuration():
    job = pod_specs()["Job/clipsite-migrate"]["containers"][0]
    assert job["command"] == ["python", "manage.py", "migrate", "--noinput"]
    assert job["envFrom"] == server_container()["envFrom"]


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


def test_compose_runs_postgres_clipsite_and_nginx():
    services = compose()["services"]
    assert set(services) == {"db", "clipsite", "nginx"}
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
