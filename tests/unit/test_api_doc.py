"""docs/API.md stays true to the code: every setting the code reads is in its settings
tables, every route and problem type of the app is in it, and it names nothing else."""

from __future__ import annotations

import re
from pathlib import Path

from starlette.routing import Route

from orders import errors
from orders.api.problems import INTERNAL, PROBLEM_TYPES, problem_type
from orders.app import create_app
from orders.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOC = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
NAME = re.compile(r"\b(?:ORDERS|PROMETHEUS)_[A-Z][A-Z0-9_]*")


def test_every_setting_the_code_reads_is_in_the_settings_tables():
    # `dev` is set by code only (orders dev, the tests), never from the environment.
    fields = {"ORDERS_" + name.upper() for name in Settings.model_fields if name != "dev"}
    # Variables read by name outside Settings (orders dev's, prometheus_client's).
    read_by_name = {
        name for path in (ROOT / "orders").rglob("*.py") for name in NAME.findall(path.read_text(encoding="utf-8"))
    }
    in_code = fields | read_by_name
    documented = {name for line in DOC.splitlines() if line.startswith("| `") for name in NAME.findall(line.split(" | ")[0])}
    assert not in_code - documented, f"settings missing from docs/API.md: {sorted(in_code - documented)}"
    assert not documented - in_code, f"docs/API.md documents settings the code never reads: {sorted(documented - in_code)}"


def _exception_classes() -> list[type[errors.OrdersError]]:
    import orders.db.pool  # noqa: F401  (ConnectionLost)

    found, todo = [], [errors.OrdersError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def _problem_types() -> set[tuple[int, str]]:
    return {(t.status, t.slug) for t in PROBLEM_TYPES.values()}


def test_every_exception_of_the_service_answers_a_problem_type_of_its_own():
    """A new exception class left out of orders/api/problems.py would answer a bare 500."""
    unmapped = [
        cls.__name__ for cls in _exception_classes()[1:] if problem_type(cls.__new__(cls)) is INTERNAL
    ]
    assert not unmapped, f"exceptions without a problem type: {unmapped}"


def test_the_problem_tables_list_every_problem_type():
    errors_table = {(int(status), slug) for status, slug in re.findall(r"^\| (\d{3}) \| `([a-z-]+)` \|", DOC, re.M)}
    guide_table = {(int(status), slug) for slug, status in re.findall(r"^\| `([a-z-]+)` \((\d{3})\) \|", DOC, re.M)}
    # The problem types of the service's exceptions, and the framework's own errors that can reach a client: an
    # unknown path or method, a refused CORS preflight.
    raised = _problem_types() | {(404, "not-found"), (405, "method-not-allowed"), (400, "bad-request")}
    assert raised <= errors_table, f"missing from the Errors table: {sorted(raised - errors_table)}"
    # Problems answered outside the classes (the HTTP protocol's, CORS) name their slug in the source.
    source = "".join(path.read_text(encoding="utf-8") for path in (ROOT / "orders").rglob("*.py"))
    unknown = sorted(slug for _, slug in errors_table if f'"{slug}"' not in source)
    assert not unknown, f"the Errors table names problems the code never answers: {unknown}"
    assert guide_table == errors_table, f"the frontend guide's table differs: {sorted(guide_table ^ errors_table)}"


def _normalise(path: str) -> str:
    return re.sub(r"\{[^}]+\}", "{}", path)


def test_every_route_is_documented_and_every_documented_route_exists():
    app = create_app(Settings(_env_file=None, dev=True))  # type: ignore[call-arg]
    routes = {
        (method, _normalise(route.path))
        for route in app.routes
        if isinstance(route, Route)
        for method in (route.methods or ()) - {"HEAD"}
    }
    documented = {(m, _normalise(p)) for m, p in re.findall(r"`(GET|POST|PUT|PATCH|DELETE) (/[^`?\s]*)", DOC)}
    assert not routes - documented, f"routes missing from docs/API.md: {sorted(routes - documented)}"
    assert not documented - routes, f"docs/API.md documents routes the app lacks: {sorted(documented - routes)}"
