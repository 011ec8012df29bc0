"""Resources to and from YAML and JSON documents (what ``netctl apply -f`` reads and ``get`` prints)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from typing import Any

from datastore.errors import ValidationError
from datastore.model import ACCEPTED_API_VERSIONS, Metadata, Resource, decode_fields, encode_fields
from datastore.resources import check_metadata_name, kind_named, validate_labels


def decode(doc: Any, where: str = "document") -> Resource:
    """One parsed document → a validated :class:`Resource`."""
    if not isinstance(doc, Mapping):
        raise ValidationError(f"{where} is not a mapping")
    if isinstance(doc, Mapping) and doc.get("kind") == "NetworkPolicy" and "networking.k8s.io" in str(
            doc.get("apiVersion")):
        # Imported only for such a document: every CNI call decodes resources through here.
        from datastore.k8s_netpol import is_k8s_netpol, translate

        if is_k8s_netpol(doc):
            return translate(doc, where)
    api = doc.get("apiVersion")
    if api not in ACCEPTED_API_VERSIONS:
        raise ValidationError(f"{where}: apiVersion {api!r} is not supported (use {ACCEPTED_API_VERSIONS[0]})")
    kind_name = doc.get("kind")
    if not isinstance(kind_name, str):
        raise ValidationError(f"{where}: kind is missing")
    kind = kind_named(kind_name)
    unknown = sorted(set(doc) - {"apiVersion", "kind", "metadata", "spec", *(("status",) if kind.STATUS else ())})
    if unknown:
        raise ValidationError(f"{where}: unknown top-level field {unknown[0]!r}")
    meta_doc = dict(doc.get("metadata") or {})
    # resourceVersion is the key's revision, never stored; uid and creationTimestamp are read
    # back from the store, and on writes the store's own values replace whatever a document says.
    resource_version = str(meta_doc.pop("resourceVersion", "") or "")
    metadata = decode_fields(Metadata, meta_doc, "metadata")
    metadata.resource_version = resource_version
    check_metadata_name(kind, metadata.name)
    validate_labels(metadata.labels, f"{kind.KIND} {metadata.name} metadata.labels")
    if kind.NAMESPACED:
        metadata.namespace = metadata.namespace or "default"
    elif metadata.namespace:
        raise ValidationError(f"{kind.KIND} is not namespaced; remove metadata.namespace")
    spec: Any = decode_fields(kind.SPEC, doc.get("spec"), "spec")
    status: Any = decode_fields(kind.STATUS, doc["status"], "status") if kind.STATUS and doc.get("status") else None
    return Resource(kind, metadata, spec, status)


def load_documents(text: str, source: str = "input") -> Iterator[Any]:
    """The documents of a YAML stream (JSON is YAML), a JSON list, or a Kubernetes ``List``.

    The text is untrusted: alias bombs and deep nesting are refused (``datastore.bounded_yaml``)."""
    import yaml  # only netctl reads YAML; the CNI plugins' stored JSON does not need it

    from datastore.bounded_yaml import TooComplex, load_all

    try:
        docs = [d for d in load_all(text) if d is not None]
    except TooComplex as e:
        raise ValidationError(f"{source} is refused: {e}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise ValidationError(f"{source} is not valid YAML or JSON{at}: {getattr(e, 'problem', e)}") from None
    for doc in docs:
        if isinstance(doc, list):
            yield from doc
        elif isinstance(doc, Mapping) and doc.get("kind") == "List":
            yield from doc.get("items") or []
        else:
            yield doc


def stored_bytes(resource: Resource) -> bytes:
    """What is written to etcd: the document without server-side metadata."""
    doc = resource.to_dict()
    meta = doc["metadata"]
    meta.pop("resourceVersion", None)
    return json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()


def from_stored(value: bytes, mod_revision: int, key: str) -> Resource:
    try:
        resource = decode(json.loads(value), key)
    except (ValueError, ValidationError) as e:
        raise ValidationError(f"stored resource {key} is corrupt: {e}") from None
    except RecursionError:  # json's C decoder recurses per level of nesting
        raise ValidationError(f"stored resource {key} is corrupt: nested too deeply") from None
    resource.metadata.resource_version = str(mod_revision)
    return resource


def to_document(resource: Resource) -> dict[str, Any]:
    doc = resource.to_dict()
    doc["metadata"] = encode_fields(resource.metadata)
    return doc


def dump(resources: list[Resource], fmt: str, *, single: bool = False) -> str:
    """YAML (one document each) or JSON (the resource when ``single``, else a ``List``)."""
    docs = [to_document(r) for r in resources]
    if fmt == "json":
        body: Any = docs[0] if single and docs else {"apiVersion": "v1", "kind": "List", "items": docs}
        return json.dumps(body, indent=2, sort_keys=False) + "\n"
    import yaml

    return yaml.safe_dump_all(docs, sort_keys=False, default_flow_style=False)
