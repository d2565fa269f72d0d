"""Payload formats: how a key's bytes become a value, and a value becomes bytes.

The original's library was typed by payload: a ``KeyValueDeserialization`` turned a key's
bytes into a value and an optional ``KeyValueSerialization`` turned a value into bytes. Here
each format is one small object doing both (``JsonPayloads``, ``YamlPayloads``,
``TextPayloads``, ``BytesPayloads``, and ``SchemaPayloads`` adding marshmallow schemas per key
glob). The server validates a payload by deserializing it with the format its settings name
(``make_payloads``), and a reader built with the same object gets typed values
(``commit.value``): one concept on both sides. Stored bytes are never rewritten.
"""

from __future__ import annotations

import fnmatch
import importlib
import json
from collections.abc import Mapping
from typing import Any
from typing import Protocol
from typing import runtime_checkable

import yaml
from marshmallow import Schema
from marshmallow import ValidationError

from rainer_server.errors import ConfigurationError
from rainer_server.errors import PayloadRejected


@runtime_checkable
class KeyValueDeserialization(Protocol):
    """Turns a key's payload bytes into a value (the original's ``KeyValueDeserialization``)."""

    def deserialize(self, key: str, data: bytes) -> Any:
        """The value of ``key``'s payload ``data``; raises when ``data`` is not one."""


@runtime_checkable
class KeyValueSerialization(Protocol):
    """Turns a key's value into payload bytes (the original's ``KeyValueSerialization``)."""

    def serialize(self, key: str, value: Any) -> bytes:
        """The payload of ``value`` for ``key``; raises when ``value`` cannot be written."""


class Payloads:
    """A payload format: both a ``KeyValueDeserialization`` and a ``KeyValueSerialization``.

    ``deserialize`` raises ``PayloadRejected`` with the reason the server answers
    (``400 Malformed input: <reason>``); ``serialize`` raises it for a value the format cannot
    write, so a commit built from a value is one the server accepts.
    """

    #: The ``RAINER_PAYLOAD_FORMAT`` naming this format.
    name = ""

    def deserialize(self, key: str, data: bytes) -> Any:
        raise NotImplementedError

    def serialize(self, key: str, value: Any) -> bytes:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class JsonPayloads(Payloads):
    """A JSON document in UTF-8. ``NaN`` and ``Infinity`` are refused both ways: they are not
    JSON, and other readers (browsers, Go, the JVM's Jackson) reject them."""

    name = "json"

    def deserialize(self, key: str, data: bytes) -> Any:
        try:
            return json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
        except UnicodeDecodeError as exc:
            raise PayloadRejected(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
        except ValueError as exc:
            raise PayloadRejected(_one_line(str(exc))) from None
        except RecursionError:
            raise PayloadRejected("nested too deeply") from None

    def serialize(self, key: str, value: Any) -> bytes:
        try:
            return json.dumps(value, ensure_ascii=False, allow_nan=False).encode("utf-8")
        except (TypeError, ValueError, RecursionError) as exc:
            raise PayloadRejected(f"cannot write as JSON: {_one_line(str(exc))}") from None


class YamlPayloads(Payloads):
    """A YAML document, read with ``safe_load``: plain data only, never arbitrary objects."""

    name = "yaml"

    def deserialize(self, key: str, data: bytes) -> Any:
        try:
            return yaml.safe_load(data)
        except yaml.YAMLError as exc:
            raise PayloadRejected(_one_line(str(exc))) from None
        except RecursionError:
            raise PayloadRejected("nested too deeply") from None

    def serialize(self, key: str, value: Any) -> bytes:
        try:
            text = yaml.safe_dump(value, allow_unicode=True, sort_keys=False)
        except (yaml.YAMLError, RecursionError) as exc:
            raise PayloadRejected(f"cannot write as YAML: {_one_line(str(exc))}") from None
        return text.encode("utf-8")


class TextPayloads(Payloads):
    """UTF-8 text; the value is a ``str``."""

    name = "text"

    def deserialize(self, key: str, data: bytes) -> str:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise PayloadRejected(f"not UTF-8: {exc.reason} at byte {exc.start}") from None

    def serialize(self, key: str, value: Any) -> bytes:
        if not isinstance(value, str):
            raise PayloadRejected(f"text payloads must be str, not {type(value).__name__}")
        try:
            return value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PayloadRejected(f"not UTF-8: {exc.reason} at {exc.start}") from None


class BytesPayloads(Payloads):
    """Any bytes; the value is the payload itself."""

    name = "bytes"

    def deserialize(self, key: str, data: bytes) -> bytes:
        return bytes(data)

    def serialize(self, key: str, value: Any) -> bytes:
        if not isinstance(value, (bytes, bytearray, memoryview)):
            raise PayloadRejected(f"bytes payloads must be bytes, not {type(value).__name__}")
        return bytes(value)


class SchemaPayloads(Payloads):
    """A base format whose values must also match a marshmallow schema for the keys it names.

    Every schema whose glob matches a key must load the key's value (as the server has always
    checked); the value read is what the first of them loads (a ``post_load`` object, or the
    loaded dict). Keys no glob matches are the base format's values.

    :param base: the format of the bytes (``JsonPayloads()`` or ``YamlPayloads()``).
    :param schemas: key glob (``fnmatch``, case-sensitive) -> a ``Schema`` instance or class,
        or ``"module:SchemaClass"`` as ``RAINER_PAYLOAD_SCHEMAS`` names them.
    :raises ConfigurationError: when a schema named by text cannot be imported.
    """

    def __init__(self, base: Payloads, schemas: Mapping[str, Schema | type[Schema] | str]) -> None:
        self.base = base
        self.name = base.name
        self.schemas = [(pattern, _schema(schema)) for pattern, schema in schemas.items()]

    def __repr__(self) -> str:
        patterns = {pattern: type(schema).__name__ for pattern, schema in self.schemas}
        return f"SchemaPayloads({self.base!r}, {patterns!r})"

    def deserialize(self, key: str, data: bytes) -> Any:
        value = self.base.deserialize(key, data)
        loaded: list[Any] = []
        for pattern, schema in self._matching(key):
            if not isinstance(value, Mapping):
                raise PayloadRejected(f"{pattern} payloads must be objects")
            try:
                loaded.append(schema.load(value))
            except ValidationError as exc:
                raise PayloadRejected(
                    f"does not match schema for {pattern}", exc.messages
                ) from None
        return loaded[0] if loaded else value

    def serialize(self, key: str, value: Any) -> bytes:
        matching = self._matching(key)
        if matching:
            # dump() does not validate; loading what it made refuses, here, a value the server
            # would refuse (a required field missing, a wrong type).
            first_pattern, first_schema = matching[0]
            try:
                dumped = first_schema.dump(value)
            except (TypeError, ValueError, AttributeError) as exc:
                raise PayloadRejected(
                    f"cannot write for schema {first_pattern}: {_one_line(str(exc))}"
                ) from None
            for pattern, schema in matching:
                messages = schema.validate(dumped)
                if messages:
                    raise PayloadRejected(f"does not match schema for {pattern}", messages)
            value = dumped
        return self.base.serialize(key, value)

    def _matching(self, key: str) -> list[tuple[str, Schema]]:
        return [(p, schema) for p, schema in self.schemas if fnmatch.fnmatchcase(key, p)]


#: ``RAINER_PAYLOAD_FORMAT`` name -> its format.
FORMATS: dict[str, type[Payloads]] = {
    cls.name: cls for cls in (JsonPayloads, YamlPayloads, TextPayloads, BytesPayloads)
}


def make_payloads(
    payload_format: str = "json",
    schemas: Mapping[str, Schema | type[Schema] | str] | None = None,
) -> Payloads:
    """The format named by ``RAINER_PAYLOAD_FORMAT``, with ``RAINER_PAYLOAD_SCHEMAS`` if any.

    :raises ConfigurationError: for an unknown format, or a schema that cannot be imported.
    """
    try:
        base = FORMATS[payload_format]()
    except KeyError:
        raise ConfigurationError(
            f"Invalid setting RAINER_PAYLOAD_FORMAT: must be one of {', '.join(FORMATS)}"
        ) from None
    return SchemaPayloads(base, schemas) if schemas else base


def import_schema(path: str) -> Schema:
    """An instance of the marshmallow schema class named ``"module:SchemaClass"``.

    :raises ConfigurationError: when it cannot be imported or is not a ``Schema``.
    """
    module_name, _, class_name = path.partition(":")
    try:
        schema_class = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise ConfigurationError(
            f"Invalid setting RAINER_PAYLOAD_SCHEMAS: cannot import {path}: {exc}"
        ) from None
    if not (isinstance(schema_class, type) and issubclass(schema_class, Schema)):
        raise ConfigurationError(
            f"Invalid setting RAINER_PAYLOAD_SCHEMAS: {path} is not a marshmallow Schema"
        )
    return schema_class()


def _schema(schema: Schema | type[Schema] | str) -> Schema:
    if isinstance(schema, Schema):
        return schema
    if isinstance(schema, type) and issubclass(schema, Schema):
        return schema()
    return import_schema(schema)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


__all__ = [
    "FORMATS",
    "BytesPayloads",
    "JsonPayloads",
    "KeyValueDeserialization",
    "KeyValueSerialization",
    "Payloads",
    "SchemaPayloads",
    "TextPayloads",
    "YamlPayloads",
    "import_schema",
    "make_payloads",
]
