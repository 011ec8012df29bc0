"""The typed shape shared by every resource: ``apiVersion``, ``kind``, ``metadata``, ``spec``.

Specs are dataclasses whose fields carry their camelCase name; :func:`decode` turns a parsed
document into them, rejecting unknown fields and wrong types with a message that names the field,
then calls the spec's ``validate()``. Inside Tortie the types can be trusted.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import reprlib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, TypeVar, get_args, get_origin

from datastore.errors import ValidationError

API_VERSION = "tortie.dev/v1"
# Calico's documents say projectcalico.org/v3; accept them so users can bring their files.
ACCEPTED_API_VERSIONS = (API_VERSION, "projectcalico.org/v3", "crd.projectcalico.org/v1")

_NAME_RE = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_LABEL_KEY_RE = re.compile(r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE_RE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")

S = TypeVar("S")


def camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def json_name(f: dataclasses.Field[Any]) -> str:
    """A field's name in documents: its ``json`` metadata, else the camelCase of its name."""
    return str(f.metadata.get("json") or camel(f.name))


def json_field(name: str, **kwargs: Any) -> Any:
    """A dataclass field whose document name is not plain camelCase (``containerID``)."""
    return field(metadata={"json": name}, **kwargs)


def check_name(value: str, what: str = "metadata.name") -> None:
    if not _NAME_RE.match(value):
        raise ValidationError(
            f"{what} {value!r} is not a valid name (lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit)")


def check_labels(labels: Mapping[str, str], what: str) -> None:
    for k, v in labels.items():
        if not _LABEL_KEY_RE.match(k):
            raise ValidationError(f"{what}: {k!r} is not a valid label key")
        if not _LABEL_VALUE_RE.match(v):
            raise ValidationError(f"{what}: {v!r} (label {k}) is not a valid label value")


@dataclass
class Metadata:
    name: str
    namespace: str | None = None
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    resource_version: str = ""
    uid: str = ""
    creation_timestamp: str = ""


# A wrong value is quoted in the message, but never whole: a list can be megabytes long.
_SHORT = reprlib.Repr()
_SHORT.maxstring = _SHORT.maxother = 80
_SHORT.maxlist = _SHORT.maxdict = 5
_SHORT.maxlevel = 3


def _describe_type(tp: Any) -> str:
    origin = get_origin(tp)
    if origin in (list, tuple):
        return "a list"
    if origin is dict or tp is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    names = {str: "a string", int: "an integer", bool: "true or false", float: "a number"}
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def _decode_value(tp: Any, value: Any, where: str) -> Any:
    origin = get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        options = [a for a in get_args(tp) if a is not type(None)]
        if value is None:
            return None
        errors = []
        for option in options:
            try:
                return _decode_value(option, value, where)
            except ValidationError as e:
                errors.append(str(e))
        raise ValidationError(errors[0])
    if origin is list:
        if not isinstance(value, list):
            raise ValidationError(f"{where} must be a list")
        (item,) = get_args(tp)
        return [_decode_value(item, v, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ValidationError(f"{where} must be a mapping")
        _, item = get_args(tp)
        return {str(k): _decode_value(item, v, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return decode_fields(typing.cast(type, tp), value, where)
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value)
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
    else:
        raise TypeError(f"unsupported field type {tp!r} at {where}")
    raise ValidationError(f"{where} must be {_describe_type(tp)}, not {_SHORT.repr(value)}")


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    # Resolving the annotations is half the cost of decoding a small resource; they never change.
    return typing.get_type_hints(cls)


def decode_fields(cls: type[S], data: Any, where: str) -> S:
    """Build dataclass ``cls`` from a camelCase mapping, naming any unknown or mistyped field."""
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ValidationError(f"{where} must be a mapping")
    hints = _type_hints(cls)  # type: ignore[arg-type]
    by_camel = {json_name(f): f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(by_camel))
    if unknown:
        raise ValidationError(f"{where} has no field {unknown[0]!r} (known: {', '.join(sorted(by_camel))})")
    kwargs = {}
    for key, f in by_camel.items():
        if key in data and data[key] is not None:
            kwargs[f.name] = _decode_value(hints[f.name], data[key], f"{where}.{key}" if where else key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ValidationError(f"{where}.{key} is required")
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def encode_fields(obj: Any, *, keep_defaults: bool = False) -> dict[str, Any]:
    """The camelCase mapping of a dataclass; empty optional values are left out."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            value = encode_fields(value, keep_defaults=keep_defaults)
        elif isinstance(value, list):
            value = [encode_fields(v) if dataclasses.is_dataclass(v) else v for v in value]
        if value is None or (not keep_defaults and value in ({}, [], "")):
            continue
        out[json_name(f)] = value
    return out


class Kind:
    """What a resource kind is called and where it is stored; subclasses set the class variables."""

    KIND: ClassVar[str]
    PLURAL: ClassVar[str]
    SHORT_NAMES: ClassVar[tuple[str, ...]] = ()
    NAMESPACED: ClassVar[bool] = False
    SPEC: ClassVar[type]
    TABLE: ClassVar[tuple[tuple[str, str], ...]] = ()  # (column, dotted spec path) for `get -o table`
    WIDE: ClassVar[tuple[tuple[str, str], ...]] = ()
    STATUS: ClassVar[type | None] = None  # the kind's status dataclass (written by agents), if it has one


@dataclass
class Resource:
    """One resource: its kind class, metadata and typed spec."""

    kind: type[Kind]
    metadata: Metadata
    spec: Any
    status: Any = None  # an instance of ``kind.STATUS``, or None

    @property
    def name(self) -> str:
        return self.metadata.name

    @property
    def namespace(self) -> str | None:
        return self.metadata.namespace

    def describe(self) -> str:
        ns = f"{self.metadata.namespace}/" if self.metadata.namespace else ""
        return f"{self.kind.KIND} {ns}{self.metadata.name}"

    def to_dict(self) -> dict[str, Any]:
        meta = encode_fields(self.metadata)
        doc = {"apiVersion": API_VERSION, "kind": self.kind.KIND, "metadata": meta, "spec": encode_fields(self.spec)}
        if self.status is not None:
            doc["status"] = encode_fields(self.status)
        return doc
