"""``/docs``: the API reference as one self-contained HTML page rendered from the app's OpenAPI document.

FastAPI's Swagger UI and ReDoc load their scripts from a CDN and render blank without internet; this page needs
nothing but the server: every operation with its summary, parameters, request body, and responses with their
fields, and a link to the machine-readable ``/openapi.json``.
"""

from __future__ import annotations

from html import escape
from typing import Any

STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;line-height:1.4}"
    "h2{margin-top:2rem;font-family:monospace}.method{color:#fff;background:#345;padding:.1rem .4rem;"
    "border-radius:.2rem}table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;"
    "text-align:left;vertical-align:top}code{background:#f3f3f3}"
)


def _schema_name(schema: dict[str, Any]) -> str:
    """A short type name: a $ref's last part, an array of it, or the JSON type."""
    if "$ref" in schema:
        return schema["$ref"].rsplit("/", 1)[-1]
    if "anyOf" in schema:
        return " | ".join(_schema_name(s) for s in schema["anyOf"])
    if schema.get("type") == "array":
        return f"array of {_schema_name(schema.get('items', {}))}"
    return str(schema.get("type", "object"))


def _fields_table(schema: dict[str, Any], components: dict[str, Any]) -> str:
    """The fields of an object schema (following one $ref) as a table; empty for other schemas."""
    if "$ref" in schema:
        schema = components.get(schema["$ref"].rsplit("/", 1)[-1], {})
    properties = schema.get("properties") or {}
    if not properties:
        return ""
    required = set(schema.get("required", []))
    rows = "".join(
        f"<tr><td><code>{escape(name)}</code>{' (required)' if name in required else ''}</td>"
        f"<td>{escape(_schema_name(field))}</td><td>{escape(field.get('description', field.get('title', '')))}</td></tr>"
        for name, field in properties.items()
    )
    return f"<table><tr><th>field</th><th>type</th><th>description</th></tr>{rows}</table>"


def _operation(path: str, method: str, operation: dict[str, Any], components: dict[str, Any]) -> str:
    parts = [f"<h2><span class=method>{method.upper()}</span> {escape(path)}</h2>"]
    parts.append(f"<p>{escape(operation.get('description') or operation.get('summary', ''))}</p>")
    parameters = operation.get("parameters", [])
    if parameters:
        rows = "".join(
            f"<tr><td><code>{escape(p['name'])}</code> ({escape(p.get('in', ''))})</td>"
            f"<td>{escape(_schema_name(p.get('schema', {})))}</td></tr>"
            for p in parameters
        )
        parts.append(f"<h3>parameters</h3><table>{rows}</table>")
    for media, body in operation.get("requestBody", {}).get("content", {}).items():
        schema = body.get("schema", {})
        parts.append(f"<h3>request body: <code>{escape(media)}</code> {escape(_schema_name(schema))}</h3>")
        parts.append(_fields_table(schema, components))
    for status, response in operation.get("responses", {}).items():
        content = response.get("content", {})
        media = ", ".join(content) or "no body"
        parts.append(f"<h3>{escape(status)}: {escape(response.get('description', ''))} (<code>{escape(media)}</code>)</h3>")
        for body in content.values():
            parts.append(_fields_table(body.get("schema", {}), components))
    return "\n".join(parts)


def render_api_docs(openapi: dict[str, Any]) -> str:
    """The HTML reference of an OpenAPI document (no script, no external resource)."""
    info = openapi.get("info", {})
    components = openapi.get("components", {}).get("schemas", {})
    operations = [
        _operation(path, method, operation, components)
        for path, methods in openapi.get("paths", {}).items()
        for method, operation in methods.items()
    ]
    title = escape(f"{info.get('title', 'API')} {info.get('version', '')}".strip())
    auth = (
        " Every operation needs the server's API key in the header <code>Authorization: Bearer &lt;key&gt;</code>;"
        " without it, or with another key, the answer is 401."
        if openapi.get("security")
        else ""
    )
    return (
        f"<!doctype html><html><head><meta charset=utf-8><title>{title}: API reference</title>"
        f"<style>{STYLE}</style></head><body><h1>{title}: API reference</h1>"
        f"<p>{escape(info.get('description', ''))} The machine-readable document: "
        f"<a href=\"/openapi.json\">/openapi.json</a>. The web page: <a href=\"/\">/</a>.{auth}</p>"
        + "\n".join(operations)
        + "</body></html>"
    )
