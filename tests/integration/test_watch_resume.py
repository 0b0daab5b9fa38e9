"""WatchTunnels as a long stream: no default deadline ends it (over HTTP either), SSE events
carry the event id and idle streams get keep-alive comments, and a watcher that comes back
(``Last-Event-ID``, or ``resume_after`` over NDJSON and gRPC) gets exactly the changes it
missed, then the live ones, without gaps or repeats at the seam."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import orjson
import pytest
import pytest_asyncio
from google.protobuf import field_mask_pb2
from tunnelplane.v1 import events_pb2, tunnels_pb2

from server.app import App
from tests.conftest import Backend, own_server
from tests.helpers import Client, TestUser, client_of, fails, http_of, sse_blocks, violations

P = tunnels_pb2
W = P.WatchTunnelsResponse
DEADLINE = 2.0
KEEPALIVE = 0.2


@pytest_asyncio.fixture(scope="module")
async def watching(
    backend: Backend, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[App]:
    """A server whose calls get a two-second default deadline and whose SSE streams get a
    keep-alive every 0.2 s."""
    directory = tmp_path_factory.mktemp("watch")
    async with own_server(
        backend, directory, default_deadline=DEADLINE, http_sse_keepalive=KEEPALIVE
    ) as server:
        yield server


@pytest_asyncio.fixture(scope="module")
async def wc(watching: App) -> AsyncIterator[Client]:
    async with client_of(watching) as client:
        yield client


@pytest_asyncio.fixture(scope="module")
async def whttp(watching: App) -> AsyncIterator[httpx.AsyncClient]:
    async with http_of(watching) as client:
        yield client


@dataclass
class Frame:
    """One SSE block: a comment, or an event with its id, type and data."""

    comment: str = ""
    id: str = ""
    event: str = ""
    data: Any = None


def parse(block: str) -> Frame:
    frame = Frame()
    for line in block.split("\n"):
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "":
            frame.comment = value
        elif field == "data":
            frame.data = orjson.loads(value)
        else:
            setattr(frame, field, value)
    return frame


async def sse_frames(response: httpx.Response) -> AsyncIterator[Frame]:
    async for block in sse_blocks(response):
        yield parse(block)


async def sse_events(response: httpx.Response) -> AsyncIterator[Frame]:
    """The stream's events, keep-alive comments skipped."""
    async for frame in sse_frames(response):
        if not frame.comment:
            yield frame


async def next_event(frames: AsyncIterator[Frame]) -> Frame:
    """The next event of ``frames``, past any keep-alive comments."""
    async for frame in frames:
        if not frame.comment:
            return frame
    raise AssertionError("the stream ended")


def kind(frame: Frame) -> str:
    return str(frame.data["result"]["kind"])


def sse(user: TestUser, last_event_id: str = "") -> dict[str, str]:
    headers = {"authorization": f"Bearer {user.access_token}", "accept": "text/event-stream"}
    if last_event_id:
        headers["last-event-id"] = last_event_id
    return headers


async def change(client: Client, owner: TestUser, name: str, text: str) -> None:
    """Change the tunnel's description (one ``tunnel.updated`` event)."""
    await client.tunnels.UpdateTunnel(
        P.UpdateTunnelRequest(
            tunnel=P.Tunnel(name=name, description=text),
            update_mask=field_mask_pb2.FieldMask(paths=["description"]),
        ),
        metadata=owner.metadata,
    )


async def logged(client: Client, owner: TestUser, name: str) -> list[str]:
    """The ids of the tunnel's events in the log, oldest first."""
    page = await client.events.ListEvents(
        events_pb2.ListEventsRequest(
            parent=owner.name, page_size=1000, filter=f'subject = "{name}"'
        ),
        metadata=owner.metadata,
    )
    return [e.name.rsplit("/", 1)[1] for e in reversed(page.events)]


async def test_an_sse_watch_outlives_the_default_deadline_and_resumes_from_last_event_id(
    wc: Client, whttp: httpx.AsyncClient
) -> None:
    owner = await wc.new_user()
    made = await wc.tunnel(owner)
    url = "/v1/users/me/tunnels:watch"
    loop = asyncio.get_running_loop()
    async with whttp.stream("GET", url, headers=sse(owner)) as response:
        assert response.status_code == 200
        frames = sse_frames(response)
        current, synced = await anext(frames), await anext(frames)
        assert (kind(current), kind(synced)) == ("KIND_CURRENT", "KIND_SYNCED")
        assert current.id == synced.id == ""  # the current state is no event
        started, keepalives = loop.time(), 0
        while loop.time() - started < DEADLINE + 0.5:  # beyond the default deadline
            assert (await anext(frames)).comment == "keep-alive"
            keepalives += 1
        await change(wc, owner, made.name, "one")
        seen = await next_event(frames)
    assert keepalives >= 5
    assert kind(seen) == "KIND_CHANGED"
    assert seen.id.startswith("evt_")
    assert seen.id == seen.data["result"]["eventId"]

    await change(wc, owner, made.name, "two")
    await change(wc, owner, made.name, "three")
    log = await logged(wc, owner, made.name)
    missed = log[log.index(seen.id) + 1 :]
    assert len(missed) == 2

    async with whttp.stream("GET", url, headers=sse(owner, seen.id)) as response:
        events = sse_events(response)
        replayed = [await anext(events) for _ in missed]
        assert [(f.id, kind(f)) for f in replayed] == [(i, "KIND_CHANGED") for i in missed]
        assert replayed[-1].data["result"]["tunnel"]["description"] == "three"
        caught_up = await anext(events)
        assert (kind(caught_up), caught_up.id) == ("KIND_SYNCED", "")
        await change(wc, owner, made.name, "four")
        live = await anext(events)
    assert live.id == (await logged(wc, owner, made.name))[-1]
    assert live.id not in [seen.id, *missed]


async def test_ndjson_resumes_with_the_resume_after_parameter(
    wc: Client, whttp: httpx.AsyncClient
) -> None:
    owner = await wc.new_user()
    made = await wc.tunnel(owner)
    await change(wc, owner, made.name, "one")
    first = (await logged(wc, owner, made.name))[-1]
    await change(wc, owner, made.name, "two")
    missed = (await logged(wc, owner, made.name))[-1]
    headers = {"authorization": f"Bearer {owner.access_token}"}
    url = f"/v1/{made.name}:watch?resumeAfter={first}"
    async with whttp.stream("GET", url, headers=headers) as response:
        lines = response.aiter_lines()
        replayed = orjson.loads(await anext(lines))["result"]
        synced = orjson.loads(await anext(lines))["result"]
    assert (replayed["kind"], replayed["eventId"]) == ("KIND_CHANGED", missed)
    assert synced["kind"] == "KIND_SYNCED"


async def test_grpc_resumes_with_resume_after(wc: Client) -> None:
    owner = await wc.new_user()
    made = await wc.tunnel(owner)
    await change(wc, owner, made.name, "one")
    first = (await logged(wc, owner, made.name))[-1]
    await change(wc, owner, made.name, "two")
    await change(wc, owner, made.name, "three")
    missed = (await logged(wc, owner, made.name))[-2:]
    me_form = made.name.replace(owner.name, "users/me")  # users/me/tunnels/{id}
    stream = wc.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name=me_form, resume_after=first), metadata=owner.metadata
    )
    got = [await asyncio.wait_for(stream.read(), 10) for _ in range(3)]
    assert [(m.kind, m.event_id) for m in got] == [
        (W.KIND_CHANGED, missed[0]),
        (W.KIND_CHANGED, missed[1]),
        (W.KIND_SYNCED, ""),
    ]
    await change(wc, owner, made.name, "four")  # a live change of a users/me/... watch
    live = await asyncio.wait_for(stream.read(), 10)
    assert (live.kind, live.tunnel.description) == (W.KIND_CHANGED, "four")
    stream.cancel()


async def test_an_event_no_longer_in_the_log_starts_the_watch_over(
    wc: Client, whttp: httpx.AsyncClient
) -> None:
    owner = await wc.new_user()
    await wc.tunnel(owner)
    unknown = "evt_" + "0" * 26
    headers = sse(owner, unknown)
    async with whttp.stream("GET", "/v1/users/me/tunnels:watch", headers=headers) as response:
        events = sse_events(response)
        assert [kind(await anext(events)) for _ in range(2)] == ["KIND_CURRENT", "KIND_SYNCED"]


@pytest.mark.parametrize("bad", ["nope", "tun_" + "0" * 26, "evt_short"])
async def test_a_resume_point_that_is_no_event_id_is_invalid(
    wc: Client, whttp: httpx.AsyncClient, bad: str
) -> None:
    owner = await wc.new_user()
    stream = wc.tunnels.WatchTunnels(
        P.WatchTunnelsRequest(name="users/me", resume_after=bad), metadata=owner.metadata
    )
    error = await fails(stream.read(), grpc.StatusCode.INVALID_ARGUMENT)
    assert "resume_after" in violations(error)
    url = "/v1/users/me/tunnels:watch"
    for request in (
        {"params": {"resumeAfter": bad}, "headers": sse(owner)},
        {"headers": sse(owner, bad)},  # Last-Event-ID
    ):
        response = await whttp.get(url, **request)  # type: ignore[arg-type]
        assert response.status_code == 400
        bad_request = next(d for d in response.json()["details"] if "BadRequest" in d["@type"])
        assert bad_request["fieldViolations"][0]["field"] == "resume_after"


async def test_changes_made_while_the_watcher_reconnects_are_neither_lost_nor_repeated(
    wc: Client,
) -> None:
    owner = await wc.new_user()
    made = await wc.tunnel(owner)
    total = 30

    async def changes() -> None:
        for i in range(total):
            await change(wc, owner, made.name, f"v{i}")

    writer = asyncio.create_task(changes())
    before = await ids_until(wc, owner, P.WatchTunnelsRequest(name="users/me"), count=5)
    resumed = P.WatchTunnelsRequest(name="users/me", resume_after=before[-1])
    await writer
    log = await logged(wc, owner, made.name)
    rest = log[log.index(before[-1]) + 1 :]
    after = await ids_until(wc, owner, resumed, count=len(rest))
    assert len(before) + len(after) == len(set(before) | set(after))  # nothing twice
    assert set(before) | set(after) == set(log[log.index(before[0]) :])  # nothing lost


async def ids_until(
    client: Client, owner: TestUser, request: P.WatchTunnelsRequest, count: int
) -> list[str]:
    """The event ids of the first ``count`` changes a watch sends, then it goes away; a
    repeat that comes right behind them is caught as well."""
    stream = client.tunnels.WatchTunnels(request, metadata=owner.metadata)
    ids: list[str] = []
    try:
        while len(ids) < count:
            message = await asyncio.wait_for(stream.read(), 10)
            if message.event_id:
                ids.append(message.event_id)
        with contextlib.suppress(TimeoutError):
            extra = await asyncio.wait_for(stream.read(), 0.3)
            if extra.event_id:
                ids.append(extra.event_id)
    finally:
        stream.cancel()
    return ids
