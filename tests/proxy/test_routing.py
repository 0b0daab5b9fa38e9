"""Routing laws: every tunnel is reachable both ways, and nothing else routes."""

from __future__ import annotations

import string

from hypothesis import given
from hypothesis import strategies as st

from proxy.routing import host_label, public_url, route, tunnel_id

ALPHABET = "0123456789abcdefghjkmnpqrstvwxyz"
ids = st.text(ALPHABET, min_size=26, max_size=26).map(lambda body: f"tun_{body}")
paths = st.text(string.ascii_letters + string.digits + "/-._~%", max_size=40).map(
    lambda p: "/" + p.lstrip("/")
)
queries = st.one_of(
    st.just(""), st.text(string.ascii_letters + "=&", max_size=20).map("?{}".format)
)


@given(ids, paths, queries)
def test_host_and_path_routes_name_the_same_tunnel_and_target(
    tid: str, path: str, query: str
) -> None:
    url = public_url(tid, "example.test")
    host = url.split("/")[2]
    by_host = route(host, path + query, "example.test")
    by_path = route("anything.else", f"/t/{tid}{path}{query}", "example.test")
    assert by_host is not None
    assert by_path is not None
    assert by_host.tunnel_id == by_path.tunnel_id == tid
    assert by_host.target == by_path.target == path + query


@given(st.text(max_size=60), st.text(max_size=60))
def test_route_never_raises_and_only_routes_real_ids(host: str, target: str) -> None:
    found = route(host, target, "example.test")
    if found is not None:
        assert tunnel_id(found.tunnel_id) == found.tunnel_id
        assert found.target.startswith("/")


def test_other_hosts_and_deeper_labels_do_not_route() -> None:
    tid = "tun_" + "a" * 26
    assert route(f"tun-{'a' * 26}.example.test.evil", "/", "example.test") is None
    assert route(f"x.tun-{'a' * 26}.example.test", "/", "example.test") is None
    assert route("example.test", "/", "example.test") is None
    assert route("example.test", "/t/tun_short/x", "example.test") is None
    assert route("example.test", "http://x/t/" + tid, "example.test") is None  # absolute form
    assert route(f"TUN-{'A' * 26}.Example.Test.:8090", "/", "example.test") is not None
    assert host_label("[::1]:8090", "example.test") is None


def test_root_and_query_forms_of_the_path_prefix() -> None:
    tid = "tun_" + "b" * 26
    assert route("h", f"/t/{tid}", "d").target == "/"  # type: ignore[union-attr]
    assert route("h", f"/t/{tid}/", "d").target == "/"  # type: ignore[union-attr]
    assert route("h", f"/t/{tid}?a=1", "d").target == "/?a=1"  # type: ignore[union-attr]
