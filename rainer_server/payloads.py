"""Payload validation: a payload must deserialize by the configured format, and match the
marshmallow schema configured for its key, if any. Bytes are never rewritten."""

from __future__ import annotations

import fnmatch
import importlib
import json
from collections.abc import Mapping
from typing import Any

import yaml
from marshmallow import Schema
from marshmallow import ValidationError

from rainer_server.errors import ConfigurationError
from rainer_server.errors import PayloadRejected


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _load_json(payload: bytes) -> Any:
    try:
        return json.loads(payload.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError as exc:
        raise PayloadRejected(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:
        raise PayloadRejected(_one_line(str(exc))) from None
    except RecursionError:
        raise PayloadRejected("nested too deeply") from None


def _load_yaml(payload: bytes) -> Any:
    try:
        return yaml.safe_load(payload)
    except yaml.YAMLError as exc:
        raise PayloadRejected(_one_line(str(exc))) from None
    except RecursionError:
        raise PayloadRejected("nested too deeply") from None


def _load_text(payload: bytes) -> Any:
    try:
        return payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PayloadRejected(f"not UTF-8: {exc.reason} at byte {exc.start}") from None


LOADERS = {"json": _load_json, "yaml": _load_yaml, "text": _load_text, "bytes": lambda p: p}


def import_schema(path: str) -> Schema:
    module_name, _, class_name = path.partition(":")
    try:
        schema_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(f"Invalid setting RAINER_PAYLOAD_SCHEMAS: cannot import {path}: {exc}") from None
    if not (isinstance(schema_class, type) and issubclass(schema_class, Schema)):
        raise ConfigurationError(f"Invalid setting RAINER_PAYLOAD_SCHEMAS: {path} is not a marshmallow Schema")
    return schema_class()


class PayloadValidator:
    """Checks payloads for one payload format and a mapping of key globs to schemas."""

    def __init__(self, payload_format: str = "json", schemas: Mapping[str, str | Schema] | None = None) -> None:
        self.payload_format = payload_format
        self._load = LOADERS[payload_format]
        self._schemas = [
            (pattern, schema if isinstance(schema, Schema) else import_schema(schema))
            for pattern, schema in (schemas or {}).items()
        ]

    def validate(self, key: str, payload: bytes) -> None:
        """:raises PayloadRejected: when ``payload`` is not acceptable for ``key``."""
        value = self._load(payload)
        for pattern, schema in self._schemas:
            if fnmatch.fnmatchcase(key, pattern):
                if not isinstance(value, Mapping):
                    raise PayloadRejected(f"{pattern} payloads must be objects")
                try:
                    schema.load(value)
                except ValidationError as exc:
                    raise PayloadRejected(f"does not match schema for {pattern}", exc.messages) from None
