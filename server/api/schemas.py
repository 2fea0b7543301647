"""Response bodies (JSON). Binary bodies (keys, ciphertexts) use heinfer.wire, not JSON."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


class ProblemOut(BaseModel):
    """Every error: RFC 9457 problem details plus a stable `code`."""

    type: str
    title: str
    status: int
    code: str = Field(description="stable machine-readable reason, see docs/SERVICE.md")
    detail: str
    request_id: str | None = None


class Limits(BaseModel):
    input_ciphertexts: int = Field(description="ciphertexts per predict request")
    max_ciphertext_bytes: int
    max_predict_body_bytes: int
    max_key_bytes: int
    wire_version: int


class ModelSummary(BaseModel):
    name: str
    plan_hash: str
    params: str = Field(description="CKKS parameters, readable")
    security_bits: int
    input_shape: list[int]
    added_at: float


class ModelPublic(BaseModel):
    """One model's public spec: all a client needs to make keys, encrypt and decode."""

    name: str
    plan_hash: str
    spec: dict[str, Any] = Field(description="heinfer.plan.ModelSpec: CKKS parameters, input "
                                             "layout, rotation steps, output decoding, plan "
                                             "format and hash")
    limits: Limits
    preprocessing: dict[str, Any] | None = Field(
        default=None, description="how raw input becomes the model's input, e.g. "
                                  "{'normalization': {'mean': m, 'std': s}}: x = (p/255 - m)/s")
    added_at: float


class SessionPublic(BaseModel):
    session_id: str
    model: str
    plan_hash: str
    created_at: float
    last_used: float
    expires_at: float = Field(description="if unused until then")
    key_bytes: int
    sections: dict[str, int] = Field(default_factory=dict,
                                     description="bytes per key section, at creation")


class Health(BaseModel):
    status: str
    workers: int | None = None
    models: int | None = None
    queue_depth: int | None = None


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for the problem statuses a route can return."""
    return {s: {"model": ProblemOut, "content": {"application/problem+json": {}}}
            for s in statuses}


def binary_body(description: str) -> dict[str, Any]:
    """OpenAPI for a raw application/octet-stream request body (read from the stream)."""
    return {"requestBody": {"required": True, "description": description, "content": {
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}}}
