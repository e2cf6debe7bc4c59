"""The service's ``/docs`` page: its OpenAPI schema as one self-contained HTML page.

FastAPI's own ``/docs`` (Swagger UI) loads its scripts from a CDN, so it is blank on the offline
hospital networks this service is meant for. This page needs nothing but the schema: per endpoint its
method, path, summary, parameters, request body and responses. ``/openapi.json`` stays the full schema
for client generators.
"""
from __future__ import annotations

from html import escape

STYLE = ("body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;padding:0 1rem;color:#222}"
         "h2{font-family:monospace;font-size:1.1rem;margin-top:2rem}.m{padding:.1rem .4rem;border-radius:.2rem;"
         "color:#fff;background:#555}.post{background:#2a6}.get{background:#26a}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2rem .5rem;text-align:left}")


def api_reference_html(schema: dict) -> str:
    info = schema.get("info", {})
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{escape(info.get('title', 'API'))}"
             f" API</title><style>{STYLE}</style></head><body>",
             f"<h1>{escape(info.get('title', 'API'))} {escape(str(info.get('version', '')))}</h1>",
             f"<p>{escape(info.get('description', ''))}</p>",
             "<p>The machine-readable schema: <a href='/openapi.json'>/openapi.json</a>.</p>"]
    for path, methods in schema.get("paths", {}).items():
        for method, op in methods.items():
            parts.append(f"<h2><span class='m {escape(method)}'>{escape(method.upper())}</span> {escape(path)}</h2>")
            parts.append(f"<p>{escape(op.get('summary', ''))}</p>")
            if op.get("description"):
                parts.append(f"<p>{escape(op['description'])}</p>")
            params = op.get("parameters", [])
            if params:
                rows = "".join(f"<tr><td><code>{escape(p['name'])}</code></td><td>{escape(p.get('in', ''))}</td>"
                               f"<td>{'yes' if p.get('required') else 'no'}</td>"
                               f"<td>{escape(p.get('description', ''))}</td></tr>" for p in params)
                parts.append(f"<table><tr><th>parameter</th><th>in</th><th>required</th><th>meaning</th></tr>"
                             f"{rows}</table>")
            body = op.get("requestBody", {}).get("content", {})
            if body:
                parts.append(f"<p>Request body: {escape(', '.join(body))}</p>")
                fields = _resolve(schema, next(iter(body.values())).get("schema", {}))
                required = set(fields.get("required", []))
                rows = "".join(f"<tr><td><code>{escape(name)}</code></td><td>{escape(_type(schema, field))}</td>"
                               f"<td>{'yes' if name in required else 'no'}</td>"
                               f"<td>{escape(field.get('description', ''))}</td></tr>"
                               for name, field in fields.get("properties", {}).items())
                if rows:
                    parts.append(f"<table><tr><th>field</th><th>type</th><th>required</th><th>meaning</th></tr>"
                                 f"{rows}</table>")
            responses = op.get("responses", {})
            if responses:
                items = "".join(f"<li><b>{escape(code)}</b> {escape(r.get('description', ''))}</li>"
                                for code, r in responses.items())
                parts.append(f"<ul>{items}</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _resolve(schema: dict, node: dict) -> dict:
    """Follow a local ``$ref`` (``#/components/schemas/...``) to the schema it names."""
    while "$ref" in node:
        target = schema
        for key in node["$ref"].lstrip("#/").split("/"):
            target = target.get(key, {})
        node = target
    return node


def _type(schema: dict, field: dict) -> str:
    field = _resolve(schema, field)
    if "type" in field:
        inner = field.get("items")
        return f"array of {_type(schema, inner)}" if field["type"] == "array" and inner else field["type"]
    return " | ".join(_type(schema, f) for f in field.get("anyOf", [])) or "any"
