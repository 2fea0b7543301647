"""Make the OpenAPI document say what the server does (checked by schemathesis in
tests/test_server_fuzz.py), and answer 405 with the `Allow` header HTTP requires.

- 422: FastAPI documents its own `HTTPValidationError` as application/json, but every error
  here is problem+json (`ProblemOut`): the document is fixed to match the responses.
- Limits that apply to whole groups of operations are documented once here rather than on each
  route: 429 on every keyed operation (rate, wrong-key throttle, quotas), 408, 413 and 415 on
  every operation with a request body, 507 on the uploads that store it.
- 405: Starlette's `Allow` names only the methods of the first route whose path matched; the
  header here lists every method served at that path.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request
from starlette.routing import Match

PROBLEM = {"application/problem+json": {"schema": {"$ref": "#/components/schemas/ProblemOut"}}}
METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")
STORING = {("post", "/v1/sessions"), ("post", "/v1/models")}


def _problem(description: str) -> dict[str, Any]:
    return {"description": description, "content": PROBLEM}


def fix_schema(schema: dict[str, Any]) -> dict[str, Any]:
    for path, item in schema.get("paths", {}).items():
        for method, op in item.items():
            responses = op.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = _problem("Validation Error")
            if op.get("security"):
                responses.setdefault("429", _problem("Too many requests (see Retry-After)"))
            if "requestBody" in op:
                responses.setdefault("408", _problem("Request body too slow"))
                responses.setdefault("413", _problem("Payload too large"))
                responses.setdefault("415", _problem("Unsupported media type"))
            if (method, path) in STORING:
                responses.setdefault("507", _problem("Insufficient storage for new uploads"))
    components = schema.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    return schema


def install_openapi(app) -> None:
    base = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = fix_schema(base())
        return app.openapi_schema

    app.openapi = openapi


def allowed_methods(request: Request) -> str:
    """Every method some route serves at this request's path, for a 405's `Allow`: each
    method is tried against the routes (included routers nest, so there is no flat list)."""
    routes = request.app.router.routes
    allowed = [m for m in METHODS
               if any(r.matches({**request.scope, "method": m})[0] == Match.FULL
                      for r in routes)]
    return ", ".join(allowed)
