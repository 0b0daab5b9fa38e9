"""What the Kubernetes provisioner applies for one proxy pool, as typed lightkube objects:
a Secret (the admin token), a ConfigMap (the proxy's config), a Deployment (the pods) and
a ClusterIP Service (link and admin ports). Pure functions; nothing here talks to a cluster.

The Deployment never states ``replicas``: the provisioner sets them through the scale
subresource, so a later apply does not reset them and the field has one owner. The config
lives in the ConfigMap, not in the pod template, so a config change (pushed live to each
instance by the caller) does not roll every pod and cut their streams; a new pod starts
with the current one.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass

from lightkube.models.apps_v1 import DeploymentSpec, DeploymentStrategy, RollingUpdateDeployment
from lightkube.models.core_v1 import (
    Capabilities,
    ConfigMapEnvSource,
    Container,
    ContainerPort,
    EmptyDirVolumeSource,
    EnvFromSource,
    EnvVar,
    EnvVarSource,
    HTTPGetAction,
    ObjectFieldSelector,
    PodSecurityContext,
    PodSpec,
    PodTemplateSpec,
    Probe,
    ResourceRequirements,
    SeccompProfile,
    SecretEnvSource,
    SecurityContext,
    ServicePort,
    ServiceSpec,
    Volume,
    VolumeMount,
)
from lightkube.models.meta_v1 import LabelSelector, ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Secret, Service

from server.domain.proxies.model import Pool

PUBLIC_PORT = 8090
LINK_PORT = 8091
ADMIN_PORT = 8092
HEALTH_PATH = "/_proxy/health"

NAME_LABEL = "app.kubernetes.io/name"
APP = "tunnelplane-proxy"
PROXY_LABEL = "tunnelplane.dev/proxy"
USER_LABEL = "tunnelplane.dev/user"
#: A hash of the admin token on the pod template: a new token rolls the pods, which read it
#: from their environment only when they start.
TOKEN_ANNOTATION = "tunnelplane.dev/admin-token-sha256"  # noqa: S105 - a name, no secret
ADMIN_TOKEN_KEY = "TP_PROXY_ADMIN_TOKEN"  # noqa: S105 - a name, no secret
CONFIG_KEY = "TP_PROXY_CONFIG"

_DNS_LABEL = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
#: An unprivileged user of no image in particular (distroless's "nonroot").
_NON_ROOT_UID = 65532


@dataclass(frozen=True, slots=True)
class PodResources:
    """Requests and limits of each proxy container (Kubernetes quantities)."""

    cpu_request: str = "100m"
    memory_request: str = "128Mi"
    cpu_limit: str = "1"
    memory_limit: str = "512Mi"


@dataclass(frozen=True, slots=True)
class PoolTemplate:
    """Where and how every pool runs: the same for all proxies of one control plane."""

    namespace: str
    image: str
    #: host:port of the control plane's gRPC Service, as the proxies dial it.
    control_plane: str
    public_domain: str = "localhost"
    resources: PodResources = dataclasses.field(default_factory=PodResources)
    #: The registry the pods share to relay requests to each other (proxy/peers.py): the
    #: server's Redis ("": none), with its key prefix. In the Secret: a URL may hold a
    #: password.
    redis_url: str = dataclasses.field(default="", repr=False)
    redis_prefix: str = "tp:"


def object_name(proxy_id: str) -> str:
    """``tp-proxy-{proxy_id with _ as -}``: the name of each of the pool's objects.
    ValueError when that is no DNS label (a Service's name must be one)."""
    name = "tp-proxy-" + proxy_id.replace("_", "-")
    if not _DNS_LABEL.fullmatch(name):
        raise ValueError(f"proxy id {proxy_id!r} makes no Kubernetes name")
    return name


def selector(proxy_id: str) -> dict[str, str]:
    """The labels that pick the pool's pods."""
    return {NAME_LABEL: APP, PROXY_LABEL: proxy_id}


def labels(pool: Pool) -> dict[str, str]:
    """The labels of every object of the pool."""
    return {**selector(pool.proxy_id), USER_LABEL: pool.user_id}


def _meta(
    pool: Pool, template: PoolTemplate, annotations: dict[str, str] | None = None
) -> ObjectMeta:
    return ObjectMeta(
        name=object_name(pool.proxy_id),
        namespace=template.namespace,
        labels=labels(pool),
        annotations=annotations,
    )


def secret(pool: Pool, template: PoolTemplate, admin_token: str) -> Secret:
    """The admin token, given to the pods as ``TP_PROXY_ADMIN_TOKEN``, and the shared
    registry's Redis (``TP_PROXY_REDIS_URL``, ``TP_PROXY_REDIS_PREFIX``) when there is one."""
    values = {ADMIN_TOKEN_KEY: admin_token}
    if template.redis_url:
        values |= {"TP_PROXY_REDIS_URL": template.redis_url,
                   "TP_PROXY_REDIS_PREFIX": template.redis_prefix}  # fmt: skip
    data = {key: base64.b64encode(value.encode()).decode() for key, value in values.items()}
    return Secret(metadata=_meta(pool, template), type="Opaque", data=data)


def config_env(pool: Pool) -> dict[str, str]:
    """The proxy's config as its environment: the whole of it as JSON, and the options its
    command line already takes from ``TP_PROXY_*`` variables."""
    config = pool.config
    return {
        CONFIG_KEY: json.dumps(dataclasses.asdict(config), sort_keys=True),
        "TP_PROXY_FIRST_BYTE_TIMEOUT": str(config.first_byte_timeout),
        "TP_PROXY_IDLE_TIMEOUT": str(config.timeout),
        "TP_PROXY_MAX_BODY_BYTES": str(config.max_body_bytes),
    }


def config_map(pool: Pool, template: PoolTemplate) -> ConfigMap:
    """The proxy's config (``config_env``) at ``pool.config_version``."""
    version = {"tunnelplane.dev/config-version": str(pool.config_version)}
    return ConfigMap(metadata=_meta(pool, template, version), data=config_env(pool))


def placement_env(pool: Pool, template: PoolTemplate) -> list[EnvVar]:
    """What every pod of the pool is told whatever the config: where to listen, whose it
    is, and where the control plane is."""
    values = {
        "TP_PROXY_HOST": "0.0.0.0",  # noqa: S104 - a pod serves on its own address
        "TP_PROXY_PORT": str(PUBLIC_PORT),
        "TP_PROXY_LINK_HOST": "0.0.0.0",  # noqa: S104
        "TP_PROXY_LINK_PORT": str(LINK_PORT),
        "TP_PROXY_ADMIN_PORT": str(ADMIN_PORT),
        "TP_PROXY_OWNER": pool.user_id,
        "TP_PROXY_CONTROL_PLANE": template.control_plane,
        "TP_PUBLIC_DOMAIN": template.public_domain,
        # Where the other pods relay to this one (proxy/peers.py): its own address.
        "TP_PROXY_ADVERTISE_URL": f"http://$(POD_IP):{PUBLIC_PORT}",
    }
    pod_ip = EnvVar(
        name="POD_IP",
        valueFrom=EnvVarSource(fieldRef=ObjectFieldSelector(fieldPath="status.podIP")),
    )
    return [pod_ip] + [EnvVar(name=name, value=value) for name, value in values.items()]


def _probe(failures: int) -> Probe:
    return Probe(
        httpGet=HTTPGetAction(path=HEALTH_PATH, port="admin"),
        periodSeconds=10,
        timeoutSeconds=5,
        failureThreshold=failures,
    )


def container(pool: Pool, template: PoolTemplate) -> Container:
    """``python -m proxy`` with its ports, environment, probes, limits and lock-down."""
    name = object_name(pool.proxy_id)
    res = template.resources
    return Container(
        name="proxy",
        image=template.image,
        command=["python", "-m", "proxy"],
        ports=[
            ContainerPort(name="public", containerPort=PUBLIC_PORT, protocol="TCP"),
            ContainerPort(name="link", containerPort=LINK_PORT, protocol="TCP"),
            ContainerPort(name="admin", containerPort=ADMIN_PORT, protocol="TCP"),
        ],
        env=placement_env(pool, template),
        envFrom=[
            EnvFromSource(configMapRef=ConfigMapEnvSource(name=name)),
            EnvFromSource(secretRef=SecretEnvSource(name=name)),
        ],
        readinessProbe=_probe(failures=3),
        livenessProbe=_probe(failures=6),
        resources=ResourceRequirements(
            requests={"cpu": res.cpu_request, "memory": res.memory_request},
            limits={"cpu": res.cpu_limit, "memory": res.memory_limit},
        ),
        securityContext=SecurityContext(
            runAsNonRoot=True,
            readOnlyRootFilesystem=True,
            allowPrivilegeEscalation=False,
            capabilities=Capabilities(drop=["ALL"]),
        ),
        volumeMounts=[VolumeMount(name="tmp", mountPath="/tmp")],  # noqa: S108 - an emptyDir
    )


def deployment(pool: Pool, template: PoolTemplate, admin_token: str) -> Deployment:
    """The pool's pods; ``replicas`` deliberately unset (see the module's docstring)."""
    digest = hashlib.sha256(admin_token.encode()).hexdigest()
    pod_meta = ObjectMeta(labels=labels(pool), annotations={TOKEN_ANNOTATION: digest})
    pod = PodSpec(
        containers=[container(pool, template)],
        automountServiceAccountToken=False,  # a proxy never calls the Kubernetes API
        enableServiceLinks=False,
        securityContext=PodSecurityContext(
            runAsNonRoot=True,
            runAsUser=_NON_ROOT_UID,
            runAsGroup=_NON_ROOT_UID,
            seccompProfile=SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[Volume(name="tmp", emptyDir=EmptyDirVolumeSource())],
    )
    return Deployment(
        metadata=_meta(pool, template),
        spec=DeploymentSpec(
            selector=LabelSelector(matchLabels=selector(pool.proxy_id)),
            template=PodTemplateSpec(metadata=pod_meta, spec=pod),
            strategy=DeploymentStrategy(
                type="RollingUpdate",
                rollingUpdate=RollingUpdateDeployment(maxUnavailable=0, maxSurge=1),
            ),
            revisionHistoryLimit=3,
        ),
    )


def service(pool: Pool, template: PoolTemplate) -> Service:
    """A ClusterIP Service in front of the pool's link and admin ports. The public side is
    reached through the shared ingress, which this provisioner does not configure."""
    return Service(
        metadata=_meta(pool, template),
        spec=ServiceSpec(
            type="ClusterIP",
            selector=selector(pool.proxy_id),
            ports=[
                ServicePort(name="link", port=LINK_PORT, targetPort="link", protocol="TCP"),
                ServicePort(name="admin", port=ADMIN_PORT, targetPort="admin", protocol="TCP"),
            ],
        ),
    )
