"""The control API's OpenAPI 3.1 document (issue 13 item 5): generated from
control.schemas, valid, committed as docs/openapi.json, served at
/v1/openapi.json, and describing exactly the routes the server registers."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import aiohttp
from openapi_spec_validator import OpenAPIV31SpecValidator, validate

from control import openapi, schemas
from tests.conftest import RelayHandle
from tests.procs import REPO

COMMITTED = REPO / "docs" / "openapi.json"


def _operations(doc: dict[str, Any]) -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in doc["paths"].items() for method in item}


async def _fetch(relay: RelayHandle, path: str) -> tuple[int, str, bytes]:
    conn = aiohttp.UnixConnector(path=relay.ctl.path)
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.get(f"http://relayd{path}") as resp:
        return resp.status, resp.content_type, await resp.read()


def test_document_is_valid_openapi_31() -> None:
    """The generated document passes openapi-spec-validator's OpenAPI 3.1 validation."""
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1.")
    validate(doc, cls=OpenAPIV31SpecValidator)


def test_validator_rejects_a_broken_document() -> None:
    """The validator used above really checks: a response without its description fails."""
    doc = openapi.document()
    del doc["paths"]["/v1/health"]["get"]["responses"]["200"]["description"]
    errors = list(OpenAPIV31SpecValidator(doc).iter_errors())
    assert errors


def test_committed_document_matches_generator() -> None:
    """docs/openapi.json is byte for byte what `python -m control.openapi` prints now."""
    out = subprocess.run([sys.executable, "-m", "control.openapi"], cwd=REPO, check=True,
                         capture_output=True, timeout=60).stdout
    assert out.decode() == openapi.dump()
    assert COMMITTED.read_text() == openapi.dump(), \
        "docs/openapi.json is stale: run `python -m control.openapi > docs/openapi.json`"


async def test_served_document_is_the_committed_one(relay: RelayHandle) -> None:
    """GET /v1/openapi.json over the real control socket answers docs/openapi.json."""
    status, ctype, body = await _fetch(relay, "/v1/openapi.json")
    assert (status, ctype) == (200, "application/json")
    assert body.decode() == COMMITTED.read_text()


async def test_every_registered_route_is_documented_and_back(relay: RelayHandle) -> None:
    """The running server's router and the document name the same (method, path) pairs."""
    runner = relay.relay.control._runners[0]  # the control socket's application
    registered = {(r.method, r.resource.canonical) for r in runner.app.router.routes()
                  if r.resource is not None}
    gets = {path for method, path in registered if method == "GET"}
    # aiohttp answers HEAD wherever it answers GET: implied, not an operation of its own
    registered = {(m, p) for m, p in registered if not (m == "HEAD" and p in gets)}
    assert registered == _operations(openapi.document())


def test_document_has_one_operation_per_table_row() -> None:
    """Every row of schemas.ROUTES is one operation, with the handler's name as its id."""
    doc = openapi.document()
    ids = [op["operationId"] for item in doc["paths"].values() for op in item.values()]
    assert sorted(ids) == sorted(r.operation for r in schemas.ROUTES)
    assert len(set(ids)) == len(ids)
    assert _operations(doc) == {(r.method, r.path) for r in schemas.ROUTES}


def test_path_parameters_match_the_templates() -> None:
    """Each `{x}` of a path is a required string path parameter of its operation."""
    for path, item in openapi.document()["paths"].items():
        named = set(re.findall(r"\{(\w+)\}", path))
        for op in item.values():
            params = {p["name"] for p in op.get("parameters", []) if p["in"] == "path"}
            assert params == named, (path, params)


def test_query_parameters_carry_types_and_bounds() -> None:
    """The query Structs' fields are the query parameters, with their bounds and choices."""
    doc = openapi.document()
    log = {p["name"]: p for p in doc["paths"]["/v1/log"]["get"]["parameters"]}
    assert set(log) == {"user", "status", "since", "limit", "message"}
    assert log["limit"]["schema"] == {"type": "integer", "minimum": 1,
                                      "maximum": schemas.LOG_LIMIT_MAX, "default": 100}
    assert log["since"]["schema"] == {"type": "number", "minimum": 0.0,
                                      "maximum": schemas.EPOCH_MAX}
    assert log["status"]["schema"] == {"enum": ["deferred", "delivered", "failed", "purged",
                                                "queued", "suppressed"]}
    assert log["message"]["schema"]["pattern"] == "^[0-9A-Fa-f]{16}$"
    assert not any(p["required"] for p in log.values())
    dormant = {p["name"]: p["schema"] for p in doc["paths"]["/v1/dormant"]["get"]["parameters"]}
    assert dormant["days"]["maximum"] == schemas.DAYS_MAX
    assert dormant["max_sent"] == {"type": "integer", "minimum": 0,
                                   "maximum": schemas.SQLITE_INT_MAX}


def test_error_statuses_answer_the_error_schema() -> None:
    """Every non-2xx response of every operation is an `Error` body; bodies are documented."""
    doc = openapi.document()
    error = {"$ref": "#/components/schemas/Error"}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            for status, resp in op["responses"].items():
                schema = resp["content"]["application/json"]["schema"]
                if not status.startswith("2"):
                    assert schema == error, (method, path, status)
            route = next(r for r in schemas.ROUTES
                         if (r.method, r.path) == (method.upper(), path))
            assert ("requestBody" in op) == (route.body is not None)
    assert set(doc["paths"]["/v1/throttle"]["get"]["responses"]) == {"200", "500", "503"}
    assert set(doc["paths"]["/v1/domains"]["post"]["responses"]) == \
        {"201", "400", "409", "413", "500", "503"}  # 503: cluster mode


async def test_documented_error_answers_conform(relay: RelayHandle) -> None:
    """A documented 404 and 400 over the real socket carry exactly the Error fields."""
    doc = json.loads(COMMITTED.read_text())
    required = set(doc["components"]["schemas"]["Error"]["properties"])
    status, _, body = await _fetch(relay, "/v1/users/nobody")
    assert status == 404 and set(json.loads(body)) == required
    status, _, body = await _fetch(relay, "/v1/log?limit=0")
    assert status == 400 and set(json.loads(body)) == required


async def _answer(relay: RelayHandle, method: str, path: str) -> tuple[int, str, dict[str, Any]]:
    conn = aiohttp.UnixConnector(path=relay.ctl.path)
    async with aiohttp.ClientSession(connector=conn) as s, \
            s.request(method, f"http://relayd{path}") as resp:
        return resp.status, resp.headers.get("Allow", ""), json.loads(await resp.read())


async def test_wrong_method_names_the_allowed_ones(relay: RelayHandle) -> None:
    """A 405 carries the Allow header RFC 9110 requires (found by schemathesis)."""
    status, allow, body = await _answer(relay, "DELETE", "/v1/users")
    assert (status, body["code"]) == (405, "method_not_allowed")
    assert set(allow.split(", ")) == {"GET", "HEAD", "POST"}


async def test_fixed_path_wins_over_a_template(relay: RelayHandle) -> None:
    """GET /v1/queue/purge is a 405 naming POST, not a lookup of message id "purge"."""
    for path in ("/v1/queue/purge", "/v1/queue/retry"):
        status, allow, body = await _answer(relay, "GET", path)
        assert (status, allow, body["code"]) == (405, "POST", "method_not_allowed"), path


async def test_null_is_not_a_query_value(relay: RelayHandle) -> None:
    """`?state=null` is a 400, not read as an absent filter (found by schemathesis)."""
    for path in ("/v1/queue?state=null", "/v1/log?status=null", "/v1/dormant?max_sent=null",
                 "/v1/log?since=null"):
        status, _, body = await _answer(relay, "GET", path)
        assert (status, body["code"]) == (400, "invalid_request"), (path, body)
    status, _, body = await _answer(relay, "GET", "/v1/queue?state=")
    assert (status, body) == (200, {"items": []})
