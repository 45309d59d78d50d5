"""The control API as an OpenAPI 3.1 document, generated from control.schemas.

Owns: turning ``schemas.ROUTES`` and the msgspec Structs into one OpenAPI 3.1
document (msgspec emits JSON Schema 2020-12, which OpenAPI 3.1 uses as is):
paths, methods, path and query parameters with their types and bounds,
request bodies, the success response and every ``Error`` status an operation
answers. The same table builds the server's router, so the document cannot
miss a route. Pure: msgspec and the standard library only.

``python -m control.openapi > docs/openapi.json`` writes the committed copy
(``dump`` is the canonical text; a test fails when the two drift); relayd
serves the same document at ``GET /v1/openapi.json``.
See also: control.schemas (the table and the types), relayd.controlplane.server.
"""

from __future__ import annotations

import inspect
import json
import re
import sys
from typing import Any

import msgspec

from control import schemas

_REF = "#/components/schemas/{name}"
_JSON = "application/json"


def _parameter_schema(prop: dict[str, Any]) -> dict[str, Any]:
    """A query property's schema without its ``null`` branch (absent is how a query says
    None) nor a ``null`` default."""
    out = dict(prop)
    branches = out.pop("anyOf", None)
    if branches is not None:
        rest = [b for b in branches if b != {"type": "null"}]
        out = {**(rest[0] if len(rest) == 1 else {"anyOf": rest}), **out}
    if out.get("default", 0) is None:
        del out["default"]
    return out


def _query_parameters(kind: type[msgspec.Struct]) -> list[dict[str, Any]]:
    _, defs = msgspec.json.schema_components([kind], ref_template=_REF)
    struct = defs[kind.__name__]
    required = set(struct.get("required", ()))
    # an empty value is read as an absent one: allowed wherever the parameter is optional
    return [{"name": name, "in": "query", "required": name in required,
             **({} if name in required else {"allowEmptyValue": True}),
             "schema": _parameter_schema(prop)}
            for name, prop in struct["properties"].items()]


def _path_parameters(route: schemas.Route) -> list[dict[str, Any]]:
    named = re.findall(r"\{(\w+)\}", route.path)
    if named != [name for name, _ in route.params]:
        raise ValueError(f"{route.method} {route.path}: path parameters {named} but"
                         f" described {[n for n, _ in route.params]}")
    return [{"name": name, "in": "path", "required": True, "description": text,
             "schema": {"type": "string", "minLength": 1}} for name, text in route.params]


def _json_content(schema: dict[str, Any]) -> dict[str, Any]:
    return {_JSON: {"schema": schema}}


def _ref(kind: type[msgspec.Struct]) -> dict[str, str]:
    return {"$ref": _REF.format(name=kind.__name__)}


def _operation(route: schemas.Route) -> dict[str, Any]:
    op: dict[str, Any] = {"operationId": route.operation, "summary": route.summary}
    params = _path_parameters(route)
    if route.query is not None:
        params += _query_parameters(route.query)
    if params:
        op["parameters"] = params
    if route.body is not None:
        required_fields = [f for f in msgspec.structs.fields(route.body) if f.required]
        op["requestBody"] = {
            # an empty body is read as ``{}``: optional where every field is
            "required": bool(required_fields),
            "content": _json_content(_ref(route.body)),
        }
    ok = _ref(route.response) if route.response is not None else {"type": "object"}
    responses: dict[str, Any] = {
        str(route.status): {"description": route.response.__doc__.strip().splitlines()[0]
                            if route.response is not None and route.response.__doc__
                            else route.summary,
                            "content": _json_content(ok)}}
    errors: dict[int, list[str]] = {}
    for status, text in route.errors:
        errors.setdefault(status, []).append(text)
    errors.setdefault(500, []).append(
        "internal error: the operation failed on the relay's side (e.g. the spool could"
        " not be written); the relayd log says why (`code` is `internal`)")
    for status in sorted(errors):
        responses[str(status)] = {"description": "; or ".join(errors[status]),
                                  "content": _json_content(_ref(schemas.Error))}
    op["responses"] = responses
    return op


def _null_last(node: Any) -> Any:
    """Every ``anyOf`` with its ``null`` branch last: msgspec versions order the branches
    of an optional field differently, and the document must not depend on the version."""
    if isinstance(node, dict):
        out = {k: _null_last(v) for k, v in node.items()}
        if isinstance(out.get("anyOf"), list):
            out["anyOf"] = sorted(out["anyOf"], key=lambda b: b == {"type": "null"})
        return out
    if isinstance(node, list):
        return [_null_last(v) for v in node]
    return node


def _clean_descriptions(node: Any) -> Any:
    """Every ``description`` (a struct's docstring) dedented with ``inspect.cleandoc``:
    msgspec 0.23 keeps the docstring's indentation where 0.22 removed it, and the
    document must not depend on the version."""
    if isinstance(node, dict):
        return {k: inspect.cleandoc(v) if k == "description" and isinstance(v, str)
                else _clean_descriptions(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_clean_descriptions(v) for v in node]
    return node


def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document of the control API, as a JSON-able dict."""
    types: list[type[msgspec.Struct]] = [schemas.Error]
    for route in schemas.ROUTES:
        for kind in (route.body, route.response):
            if kind is not None and kind not in types:
                types.append(kind)
    _, components = msgspec.json.schema_components(types, ref_template=_REF)
    paths: dict[str, dict[str, Any]] = {}
    for route in schemas.ROUTES:
        item = paths.setdefault(route.path, {})
        method = route.method.lower()
        if method in item:
            raise ValueError(f"{route.method} {route.path} is in the table twice")
        item[method] = _operation(route)
    return {
        "openapi": "3.1.0",
        "jsonSchemaDialect": "https://json-schema.org/draft/2020-12/schema",
        "info": {
            "title": "relayd control API",
            "version": str(schemas.API_VERSION),
            "summary": "Operate a relayd: domains, accounts, queues, delivery log.",
            "description": (
                "HTTP/1.1 + JSON on relayd's control socket, a Unix socket (by default"
                " DATA_DIR/control.sock, mode 0660: members of relayd's group may call it)."
                " There is no TCP listener and no authentication beyond the socket's"
                " permissions. Bodies and query strings are decoded strictly: unknown or"
                " repeated fields, wrong types and out-of-range numbers are a 400 naming"
                " the field; an empty query value is an absent one. Every failure answers"
                " an `Error` body (`error`: a sentence for a human, `code`: a stable token)"
                " with its status: also 404 `unknown_endpoint` for an unknown path and"
                " 405 `method_not_allowed` for a wrong method. `relayctl` is a client;"
                " generated from control/schemas.py by `python -m control.openapi`."),
        },
        "servers": [{"url": "http://localhost",
                     "description": "the control socket (HTTP over AF_UNIX; the host is"
                                    " not used)"}],
        "paths": paths,
        "components": {"schemas": _clean_descriptions(_null_last(components))},
    }


def dump(doc: dict[str, Any] | None = None) -> str:
    """The canonical text of the document (what docs/openapi.json holds)."""
    return json.dumps(document() if doc is None else doc, indent=2, sort_keys=True,
                      ensure_ascii=False) + "\n"


def main() -> None:
    """Print the document (``python -m control.openapi > docs/openapi.json``)."""
    sys.stdout.write(dump())


if __name__ == "__main__":
    main()
