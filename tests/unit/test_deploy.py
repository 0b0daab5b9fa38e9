"""deploy/ against the code it runs: `make lint-deploy` checks the manifests against the
Kubernetes schema; these check that they say what the server, the proxy and the
Kubernetes provisioner expect (variable names, ports, labels, permissions, scaling)."""

from __future__ import annotations

import dataclasses
import re
from functools import cache
from pathlib import Path
from typing import Any

import yaml

from server.domain.proxies.model import ScalingPolicy
from server.provision import kubernetes_objects as objects
from server.settings import Settings
from server.settings_env import env_name

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"


@cache
def manifests() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of deploy/ by (kind, name)."""
    found = {}
    for path in sorted(DEPLOY.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def container(kind: str, name: str) -> dict[str, Any]:
    [only] = manifests()[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return dict(only)


def env_names(c: dict[str, Any]) -> set[str]:
    return {e["name"] for e in c.get("env", [])}


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((DEPLOY / "kustomization.yaml").read_text())
    files = {p.name for p in DEPLOY.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def test_the_server_and_the_migration_get_only_variables_the_settings_read() -> None:
    known = {env_name(f) for f in dataclasses.fields(Settings)}
    config = manifests()[("ConfigMap", "tunnelplane-server")]["data"]
    given = set(config) | env_names(container("Deployment", "tunnelplane-server"))
    given |= env_names(container("Job", "tunnelplane-migrate"))
    assert given - known == set()
    assert {"TP_DATABASE_URL", "TP_REDIS_URL"} <= given


def test_the_server_config_passes_production_checks_once_the_secret_is_there() -> None:
    config = manifests()[("ConfigMap", "tunnelplane-server")]["data"]
    secret = {
        "TP_DATABASE_URL": "postgresql://tp@db/tunnelplane",
        "TP_REDIS_URL": "redis://redis:6379/0",
        "TP_JWT_PRIVATE_KEY": "a PEM key",
        "TP_PAGE_TOKEN_SECRET": "x" * 32,
        "TP_SECRETS_KEY": "a base64 key",
    }
    settings = Settings.from_env({**config, **secret})
    assert settings.mode == "production"
    probe = container("Deployment", "tunnelplane-server")["readinessProbe"]
    assert probe["grpc"]["port"] == settings.grpc_port


def test_the_shared_proxy_gets_only_variables_its_command_line_reads() -> None:
    source = (ROOT / "proxy" / "__main__.py").read_text()
    read = {f"TP_PROXY_{name}" for name in re.findall(r'_env\("([A-Z_]+)"', source)}
    read |= set(re.findall(r'os\.environ\.get\("(TP_[A-Z_]+)"', source))
    assert env_names(container("Deployment", "tunnelplane-proxy")) - read == set()


def test_the_proxy_autoscaler_follows_the_domain_s_scaling_policy() -> None:
    policy = ScalingPolicy()
    hpa = manifests()[("HorizontalPodAutoscaler", "tunnelplane-proxy")]["spec"]
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (policy.min_instances, policy.max_instances)
    [metric] = hpa["metrics"]
    assert metric["resource"]["target"]["averageUtilization"] == policy.target_cpu
    assert hpa["behavior"]["scaleUp"]["stabilizationWindowSeconds"] == policy.cooldown_up
    assert hpa["behavior"]["scaleDown"]["stabilizationWindowSeconds"] == policy.cooldown_down
    assert "replicas" not in manifests()[("Deployment", "tunnelplane-proxy")]["spec"]


def test_network_policies_cover_the_provisioner_s_pools_and_keep_their_admin_port_in() -> None:
    policy = manifests()[("NetworkPolicy", "tunnelplane-proxy")]["spec"]
    assert policy["podSelector"]["matchLabels"] == {objects.NAME_LABEL: objects.APP}
    admin = next(r for r in policy["ingress"] if r["ports"][0]["port"] == objects.ADMIN_PORT)
    assert admin["from"] == [
        {"podSelector": {"matchLabels": {objects.NAME_LABEL: "tunnelplane-server"}}}
    ]
    open_ports = {p["port"] for r in policy["ingress"] if "from" not in r for p in r["ports"]}
    assert open_ports == {objects.PUBLIC_PORT, objects.LINK_PORT}


def test_the_shared_proxy_s_selectors_take_no_pod_of_a_provisioned_pool() -> None:
    pool_pod = objects.selector("prx_01jd3k5x8w9y7z6v5t4s3r2q1p")
    for kind in ("Deployment", "PodDisruptionBudget"):
        wanted = manifests()[(kind, "tunnelplane-proxy")]["spec"]["selector"]["matchLabels"]
        assert not wanted.items() <= pool_pod.items()
    for name in ("tunnelplane-proxy", "tunnelplane-proxy-link"):
        wanted = manifests()[("Service", name)]["spec"]["selector"]
        assert not wanted.items() <= pool_pod.items()


def test_the_server_may_do_what_the_provisioner_asks_of_the_api_without_wildcards() -> None:
    role = manifests()[("Role", "tunnelplane-provisioner")]
    granted = {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    needed = {
        ("", r, v)
        for r in ("secrets", "configmaps", "services")
        for v in ("create", "patch", "delete")
    }
    needed |= {("apps", "deployments", v) for v in ("create", "patch", "delete")}
    needed |= {
        ("apps", "deployments/scale", "update"),
        ("", "pods", "list"),
        ("", "pods", "delete"),
    }
    assert needed <= granted
    assert not any(verb in {"*", "escalate", "bind", "impersonate"} for *_, verb in granted)
    binding = manifests()[("RoleBinding", "tunnelplane-provisioner")]
    server = manifests()[("Deployment", "tunnelplane-server")]["spec"]["template"]["spec"]
    assert binding["subjects"][0]["name"] == server["serviceAccountName"]
