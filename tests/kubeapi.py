"""A small in-process stand-in for the Kubernetes API server: real HTTP on loopback
(aiohttp), enough of the REST paths for the Kubernetes provisioner, recording every
request so that tests can check the paths, verbs, content types and bodies it sends.

It keeps the objects applied to it, defaults a new Deployment's ``replicas`` to 1 as the
API server does, keeps ``replicas`` across applies that do not state them (the scale
subresource owns that field), serves pods the test seeds (selected by label), and answers
a missing object with a ``Status`` 404. It checks no schema itself: the tests validate each
recorded body with kubernetes-validate. No cluster, controller or scheduler is involved;
``replace_deleted_pods`` imitates a ReplicaSet putting a new pod in a deleted one's place.
"""

from __future__ import annotations

import copy
import itertools
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

APPLY_PATCH = "application/apply-patch+yaml"
Key = tuple[str, str, str, str]  # (api prefix, namespace, plural, name)


@dataclass(frozen=True)
class Recorded:
    """One request as the API server got it."""

    method: str
    path: str
    query: dict[str, str]
    content_type: str
    body: dict[str, Any] | None
    authorization: str

    @property
    def call(self) -> tuple[str, str]:
        """``(method, path)``."""
        return self.method, self.path


@dataclass
class FakeKubernetes:
    """The fake API server; ``await start()``, then point a client at ``url``."""

    requests: list[Recorded] = field(default_factory=list)
    objects: dict[Key, dict[str, Any]] = field(default_factory=dict)
    #: Status codes to answer instead, by (method, path), once each.
    failures: dict[tuple[str, str], int] = field(default_factory=dict)
    replace_deleted_pods: bool = False
    url: str = ""
    _runner: web.AppRunner | None = None
    _versions: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _ips: itertools.count[int] = field(default_factory=lambda: itertools.count(100))

    async def start(self) -> None:
        """Listen on a free loopback port."""
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}"

    async def stop(self) -> None:
        """Stop listening."""
        if self._runner is not None:
            await self._runner.cleanup()

    # --- what tests look at and seed ---------------------------------------------------

    def sent(self, method: str | None = None) -> list[Recorded]:
        """The requests so far (of one method)."""
        return [r for r in self.requests if method is None or r.method == method]

    def get(self, prefix: str, namespace: str, plural: str, name: str) -> dict[str, Any]:
        """A stored object; KeyError if there is none."""
        return self.objects[(prefix, namespace, plural, name)]

    def add_pod(
        self,
        namespace: str,
        name: str,
        labels: dict[str, str],
        ip: str | None = None,
        phase: str = "Running",
        *,
        deleting: bool = False,
    ) -> dict[str, Any]:
        """Seed a pod as the ReplicaSet and kubelet would have made it."""
        now = datetime(2026, 12, 5, 9, 0, tzinfo=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
        meta["creationTimestamp"] = now
        if deleting:
            meta["deletionTimestamp"] = now
        status: dict[str, Any] = {"phase": phase, "startTime": now}
        if ip is not None:
            status["podIP"] = ip
        spec = {"containers": [{"name": "proxy", "image": "tunnelplane:test"}]}
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}
        self.objects[("api/v1", namespace, "pods", name)] = pod
        return pod

    # --- the API -----------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "")
        body = json.loads(raw) if raw else None
        self.requests.append(
            Recorded(
                request.method,
                request.path,
                dict(request.query),
                content_type.split(";")[0],
                body,
                request.headers.get("Authorization", ""),
            )
        )
        code = self.failures.pop((request.method, request.path), None)
        if code is not None:
            return _status(code, "Forbidden" if code == 403 else "InternalError", "injected")
        route = _route(request.path)
        if route is None:
            return _status(404, "NotFound", f"no route {request.path}")
        key, sub = route
        return self._answer(request.method, key, sub, body, dict(request.query), content_type)

    def _answer(
        self,
        method: str,
        key: Key,
        sub: str,
        body: dict[str, Any] | None,
        query: dict[str, str],
        content_type: str,
    ) -> web.Response:
        if method == "GET" and not key[3]:
            return self._list(key, query.get("labelSelector", ""))
        if method == "PATCH" and not sub and content_type.startswith(APPLY_PATCH) and body:
            return self._apply(key, body)
        if method == "PUT" and sub == "scale" and body:
            return self._scale(key, body)
        if method == "DELETE" and not sub:
            return self._delete(key)
        if method == "GET" and key in self.objects and not sub:
            return _json(self.objects[key])
        return _status(405, "MethodNotAllowed", f"{method} {sub or key[2]} is not served here")

    def _apply(self, key: Key, body: dict[str, Any]) -> web.Response:
        old = self.objects.get(key)
        new = copy.deepcopy(body)
        meta = new.setdefault("metadata", {})
        meta["resourceVersion"] = str(next(self._versions))
        meta["uid"] = (old or new)["metadata"].get("uid") or f"uid-{key[3]}"
        if key[2] == "deployments":
            replicas = (old or {}).get("spec", {}).get("replicas", 1)
            new["spec"].setdefault("replicas", replicas)
        self.objects[key] = new
        return _json(new, status=200 if old else 201)

    def _scale(self, key: Key, body: dict[str, Any]) -> web.Response:
        deployment = self.objects.get(key)
        if deployment is None:
            return _status(404, "NotFound", f"deployments {key[3]!r} not found")
        deployment["spec"]["replicas"] = body["spec"]["replicas"]
        scale = {
            "apiVersion": "autoscaling/v1",
            "kind": "Scale",
            "metadata": {"name": key[3], "namespace": key[1]},
            "spec": {"replicas": deployment["spec"]["replicas"]},
            "status": {"replicas": 0},
        }
        return _json(scale)

    def _list(self, key: Key, label_selector: str) -> web.Response:
        wanted = dict(part.split("=", 1) for part in label_selector.split(",") if part)
        items = [
            obj
            for (prefix, namespace, plural, _), obj in sorted(self.objects.items())
            if (prefix, namespace, plural) == key[:3]
            and wanted.items() <= obj["metadata"].get("labels", {}).items()
        ]
        kind = "PodList" if key[2] == "pods" else "List"
        listing = {"apiVersion": "v1", "kind": kind, "metadata": {}, "items": items}
        return _json(listing)

    def _delete(self, key: Key) -> web.Response:
        if key not in self.objects:
            return _status(404, "NotFound", f"{key[2]} {key[3]!r} not found")
        if key[2] != "pods":
            del self.objects[key]
            return _json(
                {"apiVersion": "v1", "kind": "Status", "metadata": {}, "status": "Success"}
            )
        # A pod ends gracefully: listed, terminating, until its containers have stopped.
        pod = self.objects[key]
        pod["metadata"]["deletionTimestamp"] = pod["metadata"]["creationTimestamp"]
        if self.replace_deleted_pods:
            labels = pod["metadata"].get("labels", {})
            self.add_pod(key[1], f"{key[3]}-next", labels, f"10.0.0.{next(self._ips)}")
        return _json(pod)


def _route(path: str) -> tuple[Key, str] | None:
    """``/api/v1/namespaces/{ns}/{plural}[/{name}[/{sub}]]`` and the same under
    ``/apis/{group}/{version}``."""
    parts = path.strip("/").split("/")
    width = 2 if parts[:1] == ["api"] else 3
    prefix, rest = "/".join(parts[:width]), parts[width:]
    if len(rest) < 3 or rest[0] != "namespaces" or len(rest) > 5:
        return None
    name = rest[3] if len(rest) > 3 else ""
    return (prefix, rest[1], rest[2], name), rest[4] if len(rest) > 4 else ""


def _json(obj: dict[str, Any], status: int = 200) -> web.Response:
    # Exactly as the API server labels it: lightkube turns an error into an ApiError only
    # for "application/json" without parameters.
    body = json.dumps(obj).encode()
    return web.Response(body=body, status=status, headers={"Content-Type": "application/json"})


def _status(code: int, reason: str, message: str) -> web.Response:
    status = {
        "apiVersion": "v1",
        "kind": "Status",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }
    return _json(status, status=code)
