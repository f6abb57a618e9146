"""Validation against the schemas of OpenAI's whole OpenAPI description (``openapi.yaml``), for the bodies the
standalone JSON Schemas beside it do not cover (the Responses API)."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

_URI = "urn:openai:openapi"


def _nullable(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable: true`` (still used in places) as JSON Schema, as the standalone files do it."""
    if isinstance(node, list):
        return [_nullable(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _nullable(v) for k, v in node.items() if k != "nullable" and k != "discriminator"}
    if node.get("nullable") is True:
        if isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
            if "enum" in out:
                out["enum"] = [*out["enum"], None]
        else:
            return {"anyOf": [out, {"type": "null"}]}
    return out


@functools.cache
def _registry(path: Path) -> Registry:
    document = _nullable(yaml.load(path.read_text(), Loader=yaml.CSafeLoader))
    resource: Resource[Any] = Resource.from_contents(document, default_specification=DRAFT202012)
    registry: Registry[Any] = Registry().with_resource(_URI, resource)
    return registry


def openapi_errors(schemas: Path, name: str, body: object) -> list[str]:
    """``body`` against ``components.schemas.<name>``; the error messages, none when valid."""
    schema = {"$ref": f"{_URI}#/components/schemas/{name}"}
    validator = Draft202012Validator(schema, registry=_registry(schemas / "openapi.yaml"))
    return [f"{list(e.absolute_path)}: {e.message}"[:300] for e in validator.iter_errors(body)]
