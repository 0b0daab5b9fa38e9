"""``If-Match`` is the request's etag (AIP-154): the generic rule of gateway.preconditions,
end to end through the echo upstream, which returns the request it received."""

from __future__ import annotations

from typing import Any

import pytest

from gateway import preconditions
from gateway.bindings import Catalog, load_descriptor_set
from tests.gateway.conftest import Running
from tests.gateway.echo_proto import DESCRIPTOR_SET
from tests.gateway.test_transcode import violation


def if_match(value: str) -> dict[str, str]:
    return {"If-Match": value}


@pytest.mark.parametrize(
    ("method", "url", "body", "echoed"),
    [
        ("PATCH", "/v1/records/r1", {"title": "t"}, ("record", "etag")),  # the resource's etag
        ("DELETE", "/v1/records/r1", None, ("etag",)),  # the request's own
        ("POST", "/v1/records/r1:archive", {"force": True}, ("etag",)),  # a custom method
    ],
)
@pytest.mark.parametrize("tag", ['"abc"', 'W/"abc"', '""', 'W/"a,b"'])
async def test_if_match_becomes_the_etag_field(
    gw: Running, method: str, url: str, body: Any, echoed: tuple[str, ...], tag: str
) -> None:
    response = await gw.http.request(method, url, json=body, headers=if_match(tag))
    assert response.status_code == 200, response.text
    document = response.json()
    for key in echoed:
        document = document[key]
    assert document == tag  # verbatim: W/ and quotes are part of an AIP-154 etag


async def test_if_match_does_not_become_a_mask_path(gw: Running) -> None:
    response = await gw.http.patch("/v1/records/r1", json={"title": "t"}, headers=if_match('"1"'))
    assert response.json()["updateMask"] == "title"
    empty = await gw.http.patch("/v1/records/r1", json={}, headers=if_match('"1"'))
    assert "updateMask" not in empty.json()
    assert empty.json()["record"] == {**empty.json()["record"], "etag": '"1"', "name": "records/r1"}


@pytest.mark.parametrize(
    ("method", "url", "body"),
    [
        ("PATCH", "/v1/records/r1", {"title": "t", "etag": '"abc"'}),
        ("DELETE", "/v1/records/r1?etag=%22abc%22", None),
        ("POST", "/v1/records/r1:archive", {"etag": '"abc"'}),
    ],
)
async def test_the_same_etag_in_header_and_request_is_fine(
    gw: Running, method: str, url: str, body: Any
) -> None:
    response = await gw.http.request(method, url, json=body, headers=if_match('"abc"'))
    assert response.status_code == 200, response.text


@pytest.mark.parametrize(
    ("method", "url", "body", "field"),
    [
        ("PATCH", "/v1/records/r1", {"title": "t", "etag": '"old"'}, "record.etag"),
        ("PATCH", "/v1/records/r1", {"etag": 'W/"abc"'}, "record.etag"),  # W/ is part of the tag
        ("DELETE", "/v1/records/r1?etag=%22old%22", None, "etag"),
        ("POST", "/v1/records/r1:archive", {"etag": '"old"'}, "etag"),
    ],
)
async def test_an_etag_that_differs_from_if_match_is_400(
    gw: Running, method: str, url: str, body: Any, field: str
) -> None:
    response = await gw.http.request(method, url, json=body, headers=if_match('"abc"'))
    assert violation(response) == field
    assert "If-Match" in response.text


async def test_if_match_star_sets_no_etag(gw: Running) -> None:
    plain = await gw.http.delete("/v1/records/r1", headers=if_match("*"))
    assert plain.status_code == 200
    assert plain.json()["etag"] == ""
    kept = await gw.http.delete("/v1/records/r1?etag=%22q%22", headers=if_match("*"))
    assert kept.json()["etag"] == '"q"'


@pytest.mark.parametrize(
    "headers",
    [
        [("If-Match", '"a", "b"')],
        [("If-Match", '"a"'), ("If-Match", '"b"')],  # two lines are one list
        [("If-Match", "abc")],  # unquoted
        [("If-Match", "W/abc")],
        [("If-Match", '"a" junk')],
        [("If-Match", '* , "a"')],
        [("If-Match", '"a"b"')],
    ],
)
async def test_if_match_that_is_not_one_entity_tag_is_400(
    gw: Running, headers: list[tuple[str, str]]
) -> None:
    response = await gw.http.delete("/v1/records/r1", headers=headers)
    assert violation(response) == "If-Match"


async def test_if_match_on_a_route_without_an_etag_field_is_left_to_the_service(
    gw: Running,
) -> None:
    thing = await gw.http.get("/v1/things/t", headers=if_match("junk, not checked"))
    assert thing.status_code == 200
    echoed = await gw.http.post("/v1/headers", json={}, headers=if_match('"abc"'))
    assert echoed.json()["received"]["grpcgateway-if-match"] == '"abc"'


def test_etag_path_of_each_route() -> None:
    catalog = Catalog.build(load_descriptor_set(DESCRIPTOR_SET))
    paths = {(b.method.name, b.index): tuple(f.name for f in b.etag) for b in catalog.bindings}
    assert paths[("UpdateRecord", 0)] == ("record", "etag")
    assert paths[("DeleteRecord", 0)] == ("etag",)
    assert paths[("ArchiveRecord", 0)] == ("etag",)
    assert paths[("GetThing", 0)] == ()
    assert paths[("UpdateThing", 0)] == ()  # Thing has no etag
    assert paths[("Upload", 0)] == ()


@pytest.mark.parametrize(
    ("header", "tag"),
    [("", None), ("*", None), (" * ", None), ('"x"', '"x"'), ('W/"x"', 'W/"x"'), ('""', '""')],
)
def test_if_match_tag(header: str, tag: str | None) -> None:
    assert preconditions.if_match_tag(header) == tag
