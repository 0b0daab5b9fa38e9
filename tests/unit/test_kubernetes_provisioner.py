"""The Kubernetes provisioner against the Kubernetes API as a schema, not a cluster: it
talks real HTTP to the in-process fake API server of tests/kubeapi.py, every body it
sends is validated (strict) with kubernetes-validate for the Kubernetes version `make
lint` validates deploy/ against, and its paths, verbs and content types are checked."""

from __future__ import annotations

import base64
import dataclasses
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
from lightkube import ApiError, AsyncClient, KubeConfig
from lightkube.config.models import Cluster, User

from server.domain.proxies.model import Instance, Pool, ProxyConfig
from server.provision.kubernetes import FIELD_MANAGER, KubernetesProvisioner
from server.provision.kubernetes_objects import object_name
from tests.kubeapi import APPLY_PATCH, FakeKubernetes

ROOT = Path(__file__).resolve().parents[2]
#: The version `make lint` validates deploy/ against (one pin, in the Makefile).
KUBERNETES_VERSION = re.search(
    r"^KUBERNETES_VERSION := (\S+)$", (ROOT / "Makefile").read_text(), re.MULTILINE
).group(1)  # type: ignore[union-attr]
NS = "tunnelplane-proxies"
PROXY = "prx_01jd3k5x8w9y7z6v5t4s3r2q1p"
USER = "usr_01jd3k5x8w9y7z6v5t4s3r2q1a"
NAME = "tp-proxy-prx-01jd3k5x8w9y7z6v5t4s3r2q1p"
CORE = f"/api/v1/namespaces/{NS}"
APPS = f"/apis/apps/v1/namespaces/{NS}"
LABELS = {
    "app.kubernetes.io/name": "tunnelplane-proxy",
    "tunnelplane.dev/proxy": PROXY,
    "tunnelplane.dev/user": USER,
}
TOKEN = "admin-token-of-the-test"
CONFIG = ProxyConfig(timeout=45.0, max_body_bytes=1 << 20)


def pool(replicas: int = 3, proxy_id: str = PROXY) -> Pool:
    return Pool(proxy_id, USER, replicas, CONFIG, config_version=4)


@pytest.fixture
async def api() -> AsyncIterator[FakeKubernetes]:
    fake = FakeKubernetes()
    await fake.start()
    yield fake
    await fake.stop()


REDIS = "redis://:hunter2@redis.tunnelplane.svc:6379/0"


@pytest.fixture
async def provisioner(api: FakeKubernetes) -> AsyncIterator[KubernetesProvisioner]:
    config = KubeConfig.from_one(cluster=Cluster(server=api.url), user=User(token="sa-token"))
    client = AsyncClient(config, field_manager=FIELD_MANAGER, trust_env=False)
    kube = KubernetesProvisioner(
        NS,
        "tunnelplane:test",
        "tunnelplane-server.tunnelplane.svc:50051",
        client=client,
        public_domain="tunnels.example.com",
        redis_url=REDIS,
        redis_prefix="tp:prod:",
    )
    yield kube
    await kube.close()


def validate_every_body(api: FakeKubernetes) -> int:
    """Validate each body sent (strict: no unknown field); how many there were."""
    bodies = [r.body for r in api.requests if r.body is not None]
    for body in bodies:
        kubernetes_validate.validate(body, KUBERNETES_VERSION, strict=True)
    return len(bodies)


def body_of(api: FakeKubernetes, method: str, path: str) -> dict[str, Any]:
    [request] = [r for r in api.requests if r.call == (method, path)]
    assert request.body is not None
    return request.body


def seed_pod(api: FakeKubernetes, name: str, ip: str | None, **kwargs: Any) -> None:
    """A pod of the proxy's pool, as valid as one the API server would list."""
    pod = api.add_pod(NS, name, dict(LABELS), ip, **kwargs)
    kubernetes_validate.validate(pod, KUBERNETES_VERSION, strict=True)


# --- apply ---------------------------------------------------------------------------


async def test_apply_sends_schema_valid_objects_by_server_side_apply_then_scales(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(replicas=3), TOKEN)

    assert [r.call for r in api.requests] == [
        ("PATCH", f"{CORE}/secrets/{NAME}"),
        ("PATCH", f"{CORE}/configmaps/{NAME}"),
        ("PATCH", f"{APPS}/deployments/{NAME}"),
        ("PATCH", f"{CORE}/services/{NAME}"),
        ("PUT", f"{APPS}/deployments/{NAME}/scale"),
        ("GET", f"{CORE}/pods"),
    ]
    for applied in api.sent("PATCH"):
        assert applied.content_type == APPLY_PATCH
        assert applied.query == {"fieldManager": "tunnelplane", "force": "true"}
    scale = api.sent("PUT")[0]
    assert scale.content_type == "application/json"
    assert scale.body == {
        "apiVersion": "autoscaling/v1",
        "kind": "Scale",
        "metadata": {"name": NAME, "namespace": NS},
        "spec": {"replicas": 3},
    }
    assert api.sent("GET")[0].query == {
        "labelSelector": f"app.kubernetes.io/name=tunnelplane-proxy,tunnelplane.dev/proxy={PROXY}"
    }
    assert {r.authorization for r in api.requests} == {"Bearer sa-token"}
    assert validate_every_body(api) == 5


async def test_the_validation_would_catch_a_body_off_the_schema(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    """The check above has teeth: the same Deployment with a misspelt field fails."""
    await provisioner.apply(pool(), TOKEN)
    deployment = body_of(api, "PATCH", f"{APPS}/deployments/{NAME}")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbes"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, KUBERNETES_VERSION, strict=True)


async def test_replicas_belong_to_the_scale_subresource_not_the_applied_deployment(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(replicas=3), TOKEN)
    deployment = body_of(api, "PATCH", f"{APPS}/deployments/{NAME}")
    assert "replicas" not in deployment["spec"]
    assert api.get("apis/apps/v1", NS, "deployments", NAME)["spec"]["replicas"] == 3

    api.requests.clear()
    await provisioner.apply(pool(replicas=5), TOKEN)
    assert "replicas" not in body_of(api, "PATCH", f"{APPS}/deployments/{NAME}")["spec"]
    assert body_of(api, "PUT", f"{APPS}/deployments/{NAME}/scale")["spec"] == {"replicas": 5}
    assert api.get("apis/apps/v1", NS, "deployments", NAME)["spec"]["replicas"] == 5


async def test_the_pod_template_runs_the_proxy_locked_down_with_probes_on_the_admin_port(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(), TOKEN)
    deployment = body_of(api, "PATCH", f"{APPS}/deployments/{NAME}")
    assert deployment["metadata"] == {"name": NAME, "namespace": NS, "labels": LABELS}
    selector = {k: v for k, v in LABELS.items() if k != "tunnelplane.dev/user"}
    assert deployment["spec"]["selector"] == {"matchLabels": selector}
    template = deployment["spec"]["template"]
    assert template["metadata"]["labels"] == LABELS
    pod = template["spec"]
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    [container] = pod["containers"]
    assert container["image"] == "tunnelplane:test"
    assert container["command"] == ["python", "-m", "proxy"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"public": 8090, "link": 8091, "admin": 8092}
    env = {e["name"]: e.get("value") for e in container["env"]}
    (pod_ip,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    assert pod_ip["valueFrom"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    # Other pods relay to this one at its own address (defined after POD_IP, so it expands).
    assert env["TP_PROXY_ADVERTISE_URL"] == "http://$(POD_IP):8090"
    assert list(env).index("POD_IP") < list(env).index("TP_PROXY_ADVERTISE_URL")
    assert env["TP_PROXY_OWNER"] == USER
    assert env["TP_PROXY_CONTROL_PLANE"] == "tunnelplane-server.tunnelplane.svc:50051"
    assert env["TP_PROXY_PORT"] == "8090"
    assert env["TP_PROXY_LINK_PORT"] == "8091"
    assert env["TP_PROXY_ADMIN_PORT"] == "8092"
    assert env["TP_PUBLIC_DOMAIN"] == "tunnels.example.com"
    assert container["envFrom"] == [
        {"configMapRef": {"name": NAME}},
        {"secretRef": {"name": NAME}},
    ]
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"] == {"path": "/_proxy/health", "port": "admin"}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


async def test_the_config_and_the_admin_token_reach_the_pods_through_their_objects(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(), TOKEN)
    config = body_of(api, "PATCH", f"{CORE}/configmaps/{NAME}")
    assert json.loads(config["data"]["TP_PROXY_CONFIG"]) == dataclasses.asdict(CONFIG)
    assert config["data"]["TP_PROXY_IDLE_TIMEOUT"] == "45.0"
    assert config["data"]["TP_PROXY_MAX_BODY_BYTES"] == str(1 << 20)
    assert config["metadata"]["annotations"] == {"tunnelplane.dev/config-version": "4"}
    secret = body_of(api, "PATCH", f"{CORE}/secrets/{NAME}")
    data = {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}
    assert data == {
        "TP_PROXY_ADMIN_TOKEN": TOKEN,
        "TP_PROXY_REDIS_URL": REDIS,  # the registry the pods relay through (a password in it)
        "TP_PROXY_REDIS_PREFIX": "tp:prod:",
    }
    # Token and URL appear in no other object; only the token's hash, to roll the pods.
    for request in api.sent("PATCH"):
        if request.path != f"{CORE}/secrets/{NAME}":
            assert TOKEN not in json.dumps(request.body)
            assert "hunter2" not in json.dumps(request.body)


async def test_a_new_config_does_not_roll_the_pods_but_a_new_admin_token_does(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    def template() -> dict[str, Any]:
        body = body_of(api, "PATCH", f"{APPS}/deployments/{NAME}")
        return dict(body["spec"]["template"])

    await provisioner.apply(pool(), TOKEN)
    first = template()
    api.requests.clear()
    changed = dataclasses.replace(pool(), config=ProxyConfig(timeout=10.0), config_version=5)
    await provisioner.apply(changed, TOKEN)
    assert template() == first
    api.requests.clear()
    await provisioner.apply(pool(), "another-token")
    assert template() != first


async def test_the_service_exposes_link_and_admin_ports_inside_the_cluster(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(), TOKEN)
    service = body_of(api, "PATCH", f"{CORE}/services/{NAME}")["spec"]
    assert service["type"] == "ClusterIP"
    assert {p["name"]: p["port"] for p in service["ports"]} == {"link": 8091, "admin": 8092}
    assert service["selector"] == {
        "app.kubernetes.io/name": "tunnelplane-proxy",
        "tunnelplane.dev/proxy": PROXY,
    }


async def test_apply_returns_the_pods_that_have_an_address(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    seed_pod(api, f"{NAME}-b", "10.0.0.7")
    seed_pod(api, f"{NAME}-a", "fd00::7")
    seed_pod(api, f"{NAME}-pending", None, phase="Pending")
    seed_pod(api, f"{NAME}-ending", "10.0.0.8", deleting=True)
    seed_pod(api, f"{NAME}-evicted", "10.0.0.9", phase="Failed")
    api.add_pod(NS, "tp-proxy-other", {**LABELS, "tunnelplane.dev/proxy": "prx_other"}, "10.0.0.10")

    instances = await provisioner.apply(pool(), TOKEN)

    start = datetime(2026, 12, 5, 9, 0, tzinfo=UTC)
    assert instances == [
        Instance(
            id=f"{NAME}-a",
            public_url="http://[fd00::7]:8090",
            link_address="[fd00::7]:8091",
            admin_url="http://[fd00::7]:8092",
            start_time=start,
        ),
        Instance(
            id=f"{NAME}-b",
            public_url="http://10.0.0.7:8090",
            link_address="10.0.0.7:8091",
            admin_url="http://10.0.0.7:8092",
            start_time=start,
        ),
    ]
    assert [i.id for i in await provisioner.instances(PROXY)] == [f"{NAME}-a", f"{NAME}-b"]


# --- restart, remove -----------------------------------------------------------------


async def test_restart_deletes_the_pod_and_returns_its_replacement_once_placed(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    seed_pod(api, f"{NAME}-a", "10.0.0.7")
    api.replace_deleted_pods = True

    replacement = await provisioner.restart(PROXY, f"{NAME}-a")

    assert api.sent("DELETE")[0].call == ("DELETE", f"{CORE}/pods/{NAME}-a")
    assert replacement is not None
    assert replacement.id == f"{NAME}-a-next"
    assert [i.id for i in await provisioner.instances(PROXY)] == [f"{NAME}-a-next"]


async def test_restart_returns_the_instance_it_replaces_until_a_new_one_has_an_address(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    seed_pod(api, f"{NAME}-a", "10.0.0.7")
    restarted = await provisioner.restart(PROXY, f"{NAME}-a")
    assert restarted is not None
    assert (restarted.id, restarted.admin_url) == (f"{NAME}-a", "http://10.0.0.7:8092")
    assert await provisioner.instances(PROXY) == []  # the old pod is terminating


async def test_restart_of_no_such_instance_is_none_and_deletes_nothing(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    api.add_pod(
        NS, "tp-proxy-other-a", {**LABELS, "tunnelplane.dev/proxy": "prx_other"}, "10.0.0.3"
    )
    assert await provisioner.restart(PROXY, "tp-proxy-other-a") is None
    assert await provisioner.restart(PROXY, f"{NAME}-gone") is None
    assert api.sent("DELETE") == []


async def test_remove_deletes_every_object_and_again_is_no_error(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    await provisioner.apply(pool(), TOKEN)
    api.requests.clear()

    await provisioner.remove(PROXY)

    assert [r.call for r in api.requests] == [
        ("DELETE", f"{APPS}/deployments/{NAME}"),
        ("DELETE", f"{CORE}/services/{NAME}"),
        ("DELETE", f"{CORE}/configmaps/{NAME}"),
        ("DELETE", f"{CORE}/secrets/{NAME}"),
    ]
    assert api.requests[0].query == {"propagationPolicy": "Background"}
    assert api.objects == {}
    await provisioner.remove(PROXY)  # every object answers 404 now
    assert len(api.sent("DELETE")) == 8


async def test_an_api_error_other_than_not_found_reaches_the_caller(
    api: FakeKubernetes, provisioner: KubernetesProvisioner
) -> None:
    api.failures[("DELETE", f"{APPS}/deployments/{NAME}")] = 403
    with pytest.raises(ApiError) as caught:
        await provisioner.remove(PROXY)
    assert caught.value.status.code == 403


async def test_it_says_what_it_is_and_where_it_places_pools(
    provisioner: KubernetesProvisioner,
) -> None:
    assert provisioner.kind == "kubernetes"
    assert provisioner.namespace == NS


def test_object_names_come_from_the_proxy_id() -> None:
    assert object_name(PROXY) == NAME
    with pytest.raises(ValueError, match="no Kubernetes name"):
        object_name("PRX_Upper")
    with pytest.raises(ValueError, match="no Kubernetes name"):
        object_name("prx_" + "a" * 60)
