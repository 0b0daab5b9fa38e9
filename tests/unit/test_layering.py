"""The domain's layering, as server/domain/__init__.py states it: what a domain module may
import, and from which other aggregate. Read from the source with ``ast`` (nothing is
imported), ``TYPE_CHECKING`` imports included."""

from __future__ import annotations

import ast
import graphlib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOMAIN = "server.domain"
#: Wire types, storage and shared state stay outside the domain.
FORBIDDEN = ("grpc", "google", "sqlalchemy", "redis")
#: What every aggregate publishes to the others; ``PUBLISHED`` in its __init__ adds more.
PUBLIC = frozenset({"model", "ports", "rules"})
UNIT_OF_WORK = f"{DOMAIN}.unit_of_work"


@cache
def modules() -> dict[str, Path]:
    """Every module of the domain by dotted name (a package by its own name)."""
    found = {}
    for path in sorted((ROOT / "server" / "domain").rglob("*.py")):
        dotted = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found[dotted.removesuffix(".__init__")] = path
    return found


@cache
def imports_of(module: str) -> tuple[str, ...]:
    """The modules ``module`` imports (``from pkg import mod`` counts as ``pkg.mod``)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(modules()[module].read_text())):
        if isinstance(node, ast.Import):
            found.extend(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            assert node.level == 0, f"{module}: relative import"
            base = node.module or ""
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append(sub if sub in modules() else base)
    return tuple(dict.fromkeys(found))


def domain_imports(module: str) -> list[str]:
    """What ``module`` imports from the domain (``server.domain`` itself excluded)."""
    return [m for m in imports_of(module) if m.startswith(f"{DOMAIN}.")]


def aggregate_of(module: str) -> str | None:
    """The aggregate a module belongs to (``None``: common, the unit of work, the root)."""
    parts = module.split(".")
    if len(parts) < 3 or parts[2] == "common" or f"{DOMAIN}.{parts[2]}" not in modules():
        return None
    return parts[2] if modules()[f"{DOMAIN}.{parts[2]}"].name == "__init__.py" else None


@cache
def published(aggregate: str) -> frozenset[str]:
    """The modules of ``aggregate`` other aggregates may import."""
    extra: tuple[str, ...] = ()
    for node in ast.parse(modules()[f"{DOMAIN}.{aggregate}"].read_text()).body:
        targets = node.targets if isinstance(node, ast.Assign) else []
        if any(isinstance(t, ast.Name) and t.id == "PUBLISHED" for t in targets):
            extra = ast.literal_eval(node.value)
    return PUBLIC | frozenset(extra)


def is_ports(module: str) -> bool:
    return module == UNIT_OF_WORK or module.endswith(".ports")


def reaches_ports(module: str) -> bool:
    """Whether ``module`` imports, directly or not, a unit of work or a ports module."""
    seen, todo = {module}, [module]
    while todo:
        for imported in domain_imports(todo.pop()):
            if is_ports(imported):
                return True
            if imported not in seen:
                seen.add(imported)
                todo.append(imported)
    return False


def test_the_domain_imports_no_transport_storage_or_outer_server_module() -> None:
    wrong = [
        (module, imported)
        for module in modules()
        for imported in imports_of(module)
        if imported.split(".")[0] in FORBIDDEN
        or (imported.split(".")[0] == "server" and not imported.startswith(f"{DOMAIN}."))
    ]
    assert wrong == []


def test_every_domain_module_it_imports_exists() -> None:
    missing = [
        (module, imported)
        for module in modules()
        for imported in domain_imports(module)
        if imported not in modules()
    ]
    assert missing == []


def test_common_imports_no_aggregate() -> None:
    wrong = [
        (module, imported)
        for module in modules()
        if module.startswith(f"{DOMAIN}.common")
        for imported in domain_imports(module)
        if not imported.startswith(f"{DOMAIN}.common")
    ]
    assert wrong == []


def test_aggregates_meet_only_through_what_they_publish() -> None:
    wrong = []
    for module in modules():
        own = aggregate_of(module)
        for imported in domain_imports(module):
            other = aggregate_of(imported)
            if own is None or other is None or other == own:
                continue
            if imported.split(".")[3:] not in ([leaf] for leaf in published(other)):
                wrong.append((module, imported))
    assert wrong == []


def test_models_and_ports_import_only_pure_modules() -> None:
    wrong = [
        (module, imported)
        for module in modules()
        if module.rpartition(".")[2] in {"model", "ports"}
        for imported in domain_imports(module)
        if is_ports(imported) or reaches_ports(imported)
    ]
    assert wrong == []


def test_the_domain_import_graph_has_no_cycle() -> None:
    graph = graphlib.TopologicalSorter({m: domain_imports(m) for m in modules()})
    try:
        graph.prepare()
    except graphlib.CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_every_aggregate_says_what_it_holds() -> None:
    aggregates = {aggregate_of(m) for m in modules()} - {None}
    assert aggregates >= {"identity", "tunnels", "webhooks", "limits", "events", "audit"}
    for aggregate in aggregates:
        init = modules()[f"{DOMAIN}.{aggregate}"]
        assert ast.get_docstring(ast.parse(init.read_text())), f"{init} needs a docstring"
        extra = published(aggregate) - PUBLIC
        assert extra <= {p.stem for p in init.parent.glob("*.py")}, f"{init}: no {extra}"


#: The longest a module of the product may grow before it is split (issue 11).
MAX_LINES = 500


def test_no_module_of_the_product_is_longer_than_max_lines() -> None:
    long = {
        str(path.relative_to(ROOT)): lines
        for package in ("server", "gateway", "agent", "proxy", "tplink")
        for path in (ROOT / package).rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, f"split these modules: {long}"


def _package_imports(package: str) -> set[str]:
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module:
                found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def test_the_deployables_stay_apart() -> None:
    """The agent runs on users' machines: it imports nothing of the server, the proxy or
    the gateway. The proxy borrows only the server's log format. The gateway is generic.
    The link protocol the agent and the proxy share (tplink) imports none of them."""

    def of(package: str, *others: str) -> set[str]:
        return {m for m in _package_imports(package) if m.split(".")[0] in others}

    assert of("agent", "server", "proxy", "gateway") == set()
    assert of("proxy", "server", "agent", "gateway") == {"server.logs"}
    assert of("gateway", "server", "proxy", "agent", "tplink") == set()
    assert of("tplink", "server", "proxy", "agent", "gateway") == set()
