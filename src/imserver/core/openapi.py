"""The OpenAPI 3.1 description of the HTTP API, generated from the op structs.

Every op of :data:`imserver.protocol.ops.REPLY_TYPES` becomes ``POST /api/v1/<op>``
whose request body is the op's fields (without the envelope's ``op``) and whose 200
response is the op's reply ``data``. Errors share one schema.
"""

from __future__ import annotations

from typing import Any

import msgspec

from imserver.core.router import PUBLIC_OPS
from imserver.protocol import ops
from imserver.protocol.models import ServerInfo
from imserver.utils.errors import ERRORS_BY_CODE

REF = "#/components/schemas/{name}"


class _ErrorDetail(msgspec.Struct, kw_only=True):
    code: str
    message: str
    retry_after: float | None = None
    field: str | None = None


class ErrorResponse(msgspec.Struct, kw_only=True):
    """The body of every 4xx/5xx answer of the HTTP API."""

    error: _ErrorDetail


def openapi_document(server: ServerInfo) -> dict[str, Any]:
    """Build the whole OpenAPI document."""
    op_types = list(ops.REPLY_TYPES)
    reply_types = list(dict.fromkeys(ops.REPLY_TYPES.values()))
    schemas, components = msgspec.json.schema_components(
        [*op_types, *reply_types, ErrorResponse], ref_template=REF
    )
    for op_type, schema in zip(op_types, schemas[: len(op_types)], strict=True):
        comp = components[schema["$ref"].rsplit("/", 1)[-1]]
        comp.get("properties", {}).pop("op", None)
        comp["required"] = [f for f in comp.get("required", []) if f != "op"]
        if not comp["required"]:
            del comp["required"]
        comp["description"] = (op_type.__doc__ or "").strip() or comp.get("description", "")
    error_ref = {"$ref": REF.format(name="ErrorResponse")}
    statuses = sorted({cls.status for cls in ERRORS_BY_CODE.values()})
    paths: dict[str, Any] = {}
    for op_type, reply_type in ops.REPLY_TYPES.items():
        name = ops.op_name(op_type)
        responses: dict[str, Any] = {
            "200": {
                "description": f"`{name}` succeeded",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(name=reply_type.__name__)}}
                },
            }
        }
        for status in statuses:
            codes = ", ".join(c for c, cls in ERRORS_BY_CODE.items() if cls.status == status)
            responses[str(status)] = {
                "description": codes,
                "content": {"application/json": {"schema": error_ref}},
            }
        operation: dict[str, Any] = {
            "operationId": name.replace(".", "_"),
            "summary": f"The `{name}` op",
            "requestBody": {
                "required": True,
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(name=op_type.__name__)}}
                },
            },
            "responses": responses,
        }
        if op_type in PUBLIC_OPS:
            operation["security"] = []
        paths[f"/api/v1/{name}"] = {"post": operation}
    return {
        "openapi": "3.1.0",
        "info": {"title": f"{server.name} HTTP API", "version": server.version},
        "paths": paths,
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }
