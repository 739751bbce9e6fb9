"""The OpenAPI 3.1 description of the HTTP API, generated from the op structs.

Every op of :data:`imserver.protocol.ops.REPLY_TYPES` becomes ``POST /api/v1/<op>``
whose request body is the op's fields (without the envelope's ``op``) and whose 200
response is the op's reply ``data``. Errors share one schema. The file routes of
docs/protocol.md §6 (raw-body upload, downloads with ``Range``, thumbnails) are described by
hand in :func:`file_paths`.
"""

from __future__ import annotations

from typing import Any

import msgspec

from imserver.protocol import ops
from imserver.protocol.models import ServerInfo
from imserver.services.file.api import UploadData
from imserver.services.gateway.session import PUBLIC_OPS
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
        [*op_types, *reply_types, ErrorResponse, UploadData], ref_template=REF
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
    paths.update(file_paths())
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


def _error(description: str) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": {"$ref": REF.format(name="ErrorResponse")}}},
    }


_FILE_ID = {
    "name": "id",
    "in": "path",
    "required": True,
    "schema": {"type": "string"},
    "description": "The file id from the upload's file object.",
}
_DOWNLOAD_HEADERS = {
    "Content-Disposition": {
        "description": "`attachment` with the display name as an RFC 6266 `filename*`",
        "schema": {"type": "string"},
    },
    "X-Content-Type-Options": {"schema": {"type": "string", "const": "nosniff"}},
    "Content-Length": {"schema": {"type": "integer"}},
    "ETag": {"description": "the quoted SHA-256 of the content", "schema": {"type": "string"}},
}
_ACCESS_ERRORS = {
    "401": _error("unauthorized: no or bad bearer token"),
    "403": _error("forbidden: not a member of the file's conversation"),
    "404": _error("not_found: unknown file id"),
    "429": _error("rate_limited"),
}


def file_paths() -> dict[str, Any]:
    """``POST /api/v1/files``, ``GET /api/v1/files/{id}`` and ``.../{id}/thumb``."""
    upload = {
        "operationId": "files_upload",
        "summary": "Upload a file to a conversation (raw body)",
        "description": (
            "The body is the file's bytes, streamed; the declared Content-Type is "
            "ignored (the type is sniffed from the content). Only members of `conv` may "
            "upload. Bodies over `files.max_size` (default 20 MiB) answer `too_large`, "
            "whatever Content-Length says; past the per-user quota the answer is "
            "`too_large` with `field: quota`. JPEG/PNG/GIF/WebP get a thumbnail; an image "
            "too large to decode safely (decompression bomb) is refused with `bad_request`."
        ),
        "parameters": [
            {
                "name": "conv",
                "in": "query",
                "required": True,
                "schema": {"type": "string"},
                "description": "The conversation the file belongs to (its ACL).",
            },
            {
                "name": "name",
                "in": "query",
                "required": False,
                "schema": {"type": "string"},
                "description": "Display name; path components and control characters "
                "are removed, at most 200 characters are kept.",
            },
        ],
        "requestBody": {
            "required": True,
            "content": {
                "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
                "*/*": {"schema": {"type": "string", "format": "binary"}},
            },
        },
        "responses": {
            "200": {
                "description": "stored",
                "content": {
                    "application/json": {"schema": {"$ref": REF.format(name="UploadData")}}
                },
            },
            "400": _error("bad_request: missing/invalid conv, or an image too large to process"),
            **_ACCESS_ERRORS,
            "404": _error("not_found: the conversation names an unknown user or room"),
            "413": _error("too_large: over the size limit, or over the quota (field `quota`)"),
            "503": _error("unavailable"),
        },
    }
    download = {
        "operationId": "files_download",
        "summary": "Download a file (always as an attachment)",
        "parameters": [
            _FILE_ID,
            {
                "name": "Range",
                "in": "header",
                "required": False,
                "schema": {"type": "string"},
                "description": "One range, `bytes=a-b`, `bytes=a-` or `bytes=-n`; "
                "several ranges or other units are ignored (the whole file is sent).",
            },
        ],
        "responses": {
            "200": {
                "description": "the whole file",
                "headers": _DOWNLOAD_HEADERS,
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            "206": {
                "description": "the requested range",
                "headers": {
                    **_DOWNLOAD_HEADERS,
                    "Content-Range": {"schema": {"type": "string"}},
                },
                "content": {"*/*": {"schema": {"type": "string", "format": "binary"}}},
            },
            **_ACCESS_ERRORS,
            "416": _error("bad_request: the range starts past the end of the file"),
        },
    }
    thumb = {
        "operationId": "files_thumb",
        "summary": "The thumbnail of an image (JPEG, or PNG when transparent; ≤ 320 px)",
        "parameters": [_FILE_ID],
        "responses": {
            "200": {
                "description": "the thumbnail",
                "content": {
                    "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
                    "image/png": {"schema": {"type": "string", "format": "binary"}},
                },
            },
            **_ACCESS_ERRORS,
            "404": _error("not_found: unknown file id, or a file without a thumbnail"),
        },
    }
    return {
        "/api/v1/files": {"post": upload},
        "/api/v1/files/{id}": {"get": download},
        "/api/v1/files/{id}/thumb": {"get": thumb},
    }
