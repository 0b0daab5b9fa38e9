"""The Kubernetes provisioner: a Deployment per proxy pool, scaled through its scale
subresource, with lightkube's async client and server-side apply.

Each call is declarative and idempotent, as the ``Provisioner`` port asks: ``apply``
applies the pool's objects (:mod:`server.provision.kubernetes_objects`) with one field
manager, forcing its ownership of the fields it sets, then sets the replica count on
``deployments/{name}/scale``; ``remove`` deletes them, a missing one being no error.
An instance is a pod of the pool that has an address and is neither ending nor ended.
"""

from __future__ import annotations

from collections.abc import Sequence
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

from lightkube import ApiError, AsyncClient
from lightkube.models.autoscaling_v1 import ScaleSpec
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.apps_v1 import Deployment
from lightkube.resources.core_v1 import ConfigMap, Pod, Secret, Service
from lightkube.types import CascadeType

from server.domain.proxies.model import Instance, Pool
from server.provision.kubernetes_objects import (
    ADMIN_PORT,
    LINK_PORT,
    PUBLIC_PORT,
    PodResources,
    PoolTemplate,
    config_map,
    deployment,
    object_name,
    secret,
    selector,
    service,
)

FIELD_MANAGER = "tunnelplane"
#: Pod phases after which a pod serves no more (an evicted pod stays listed as Failed).
_ENDED = frozenset({"Succeeded", "Failed"})

__all__ = ["FIELD_MANAGER", "KubernetesProvisioner", "PodResources", "instance_of"]


class KubernetesProvisioner:
    """Runs each proxy pool as a Deployment in ``namespace``: pods of ``image`` running
    ``python -m proxy``, dialling the control plane at ``control_plane`` (host:port of its
    gRPC Service). ``client`` defaults to lightkube's, configured from the pod's service
    account (or ``KUBECONFIG``)."""

    kind = "kubernetes"

    def __init__(
        self,
        namespace: str,
        image: str,
        control_plane: str,
        *,
        client: AsyncClient | None = None,
        public_domain: str = "localhost",
        resources: PodResources | None = None,
        redis_url: str = "",
        redis_prefix: str = "tp:",
    ) -> None:
        self._template = PoolTemplate(
            namespace,
            image,
            control_plane,
            public_domain,
            resources or PodResources(),
            redis_url,
            redis_prefix,
        )
        self._client = client or AsyncClient(field_manager=FIELD_MANAGER)

    @property
    def namespace(self) -> str:
        """Where the pools run."""
        return self._template.namespace

    async def apply(self, pool: Pool, admin_token: str) -> Sequence[Instance]:
        """Apply the pool's Secret, ConfigMap, Deployment and Service, then scale the
        Deployment to ``pool.replicas``; the instances that have an address now."""
        template = self._template
        objects = (
            secret(pool, template, admin_token),
            config_map(pool, template),
            deployment(pool, template, admin_token),
            service(pool, template),
        )
        for obj in objects:
            await self._client.apply(obj, field_manager=FIELD_MANAGER, force=True)
        await self._scale(pool.proxy_id, pool.replicas)
        return await self.instances(pool.proxy_id)

    async def restart(self, proxy_id: str, instance_id: str) -> Instance | None:
        """Delete the pod ``instance_id`` of the proxy; its Deployment starts another. The
        replacement if it already has an address, else the instance being replaced as it
        was last seen (Kubernetes names the replacement, later; :meth:`instances` lists it
        once it is up). None if the proxy has no such instance."""
        before = {i.id: i for i in await self.instances(proxy_id)}
        if instance_id not in before:
            return None
        if not await self._delete(Pod, instance_id):
            return None
        fresh = [i for i in await self.instances(proxy_id) if i.id not in before]
        return fresh[0] if fresh else before[instance_id]

    async def remove(self, proxy_id: str) -> None:
        """Delete the pool's Deployment (its pods with it), Service, ConfigMap and Secret."""
        name = object_name(proxy_id)
        await self._delete(Deployment, name, cascade=CascadeType.BACKGROUND)
        for kind in (Service, ConfigMap, Secret):
            await self._delete(kind, name)

    async def instances(self, proxy_id: str) -> Sequence[Instance]:
        """The pool's pods that have an address and are not going away, by name."""
        wanted: dict[str, Any] = {**selector(proxy_id)}  # lightkube's mapping is invariant
        pods = self._client.list(Pod, namespace=self.namespace, labels=wanted)
        found = [instance async for pod in pods if (instance := instance_of(pod)) is not None]
        return sorted(found, key=lambda i: i.id)

    async def close(self) -> None:
        """Close the client's connections."""
        await self._client.close()

    async def _scale(self, proxy_id: str, replicas: int) -> None:
        name = object_name(proxy_id)
        scale = Deployment.Scale(
            metadata=ObjectMeta(name=name, namespace=self.namespace),
            spec=ScaleSpec(replicas=replicas),
        )
        await self._client.replace(
            scale, name, namespace=self.namespace, field_manager=FIELD_MANAGER
        )

    async def _delete(
        self,
        kind: type[Pod | Deployment | Service | ConfigMap | Secret],
        name: str,
        cascade: CascadeType | None = None,
    ) -> bool:
        """Delete one object; False if there was none."""
        try:
            await self._client.delete(kind, name, namespace=self.namespace, cascade=cascade)
        except ApiError as exc:
            if exc.status.code != HTTPStatus.NOT_FOUND:
                raise
            return False
        return True


def instance_of(pod: Pod) -> Instance | None:
    """The instance a pod is: None while it has no address, once it is being deleted, or
    after it ended."""
    meta, status = pod.metadata, pod.status
    if meta is None or meta.name is None or status is None or not status.podIP:
        return None
    if meta.deletionTimestamp is not None or status.phase in _ENDED:
        return None
    host = f"[{status.podIP}]" if ":" in status.podIP else status.podIP
    return Instance(
        id=meta.name,
        public_url=f"http://{host}:{PUBLIC_PORT}",
        link_address=f"{host}:{LINK_PORT}",
        admin_url=f"http://{host}:{ADMIN_PORT}",
        start_time=status.startTime,
    )


if TYPE_CHECKING:
    from server.domain.proxies.ports import Provisioner

    def _meets_the_port(kube: KubernetesProvisioner) -> Provisioner:
        return kube  # mypy checks that the class has the port's shape
