"""`netctl apply | create | replace | delete | get`: resources as YAML or JSON documents.

Owns reading files, the order of checks (every document is decoded and validated, its size
checked against what etcd takes in one transaction, and every IP pool change checked against the
stored pools, before anything is written), writing one file as ONE transaction (all of it or
nothing), and the printing of tables and documents. Decoding and validation belong to `datastore.codec`, storage to
`datastore.store`, the pool rules to `ipam.pools`. Errors are raised, never printed here.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from datastore.errors import AlreadyExists, NotFound, ValidationError
from netctl.errors import UserError

if TYPE_CHECKING:  # the resource model is imported by the command that runs, not by every netctl
    from datastore.kv import TxnLimits
    from datastore.model import Kind, Resource

OUTPUT_FORMATS = ("table", "wide", "yaml", "json")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser], datastore: argparse.ArgumentParser) -> None:
    for verb, text in (("apply", "create or update the resources in FILE"),
                       ("create", "create the resources in FILE; fails if one exists"),
                       ("replace", "replace the resources in FILE; fails if one is missing")):
        p = sub.add_parser(verb, parents=[datastore], help=text, description=text)
        p.add_argument("-f", "--filename", required=True, metavar="FILE",
                       help="YAML or JSON documents (multi-document, a list, or a Kubernetes List); - for stdin")
        p.set_defaults(func=run_write, verb=verb)

    p = sub.add_parser("delete", parents=[datastore], help="delete the resources in FILE, or KIND NAME",
                       usage="netctl delete (-f FILE | KIND NAME [-n NS])")
    p.add_argument("-f", "--filename", metavar="FILE", help="delete the resources named in FILE (- for stdin)")
    p.add_argument("kind", metavar="KIND", nargs="?", help="resource kind (any case, plural or short name)")
    p.add_argument("name", metavar="NAME", nargs="?")
    p.add_argument("-n", "--namespace", help="namespace of a namespaced kind (default: default)")
    p.set_defaults(func=run_delete, parser=p)

    p = sub.add_parser("get", parents=[datastore], help="show resources")
    p.add_argument("kind", metavar="KIND", help="resource kind (any case, plural or short name)")
    p.add_argument("name", metavar="NAME", nargs="?")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", help="namespace of a namespaced kind (default: default)")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="every namespace")
    p.add_argument("-o", "--output", choices=OUTPUT_FORMATS, default="table", help="output format")
    p.set_defaults(func=run_get, parser=p)


# ---- reading documents -------------------------------------------------------------------------


def read_source(path: str) -> tuple[str, str]:
    """The text of FILE (stdin for ``-``) and a name for it in messages."""
    if path == "-":
        return sys.stdin.read(), "stdin"
    try:
        with open(path, encoding="utf-8") as f:
            return f.read(), path
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise UserError(f"{path} is not UTF-8 text") from None


def decode_all(text: str, source: str) -> list[Resource]:
    """Every document decoded and validated, or a ValidationError naming the first bad one."""
    from datastore.codec import decode, load_documents

    resources: list[Resource] = []
    seen: set[tuple[str, str | None, str]] = set()
    for n, doc in enumerate(load_documents(text, source), start=1):
        where = f"{source} document {n}"
        try:
            resource = decode(doc, where)
            _name_namespace(resource)
        except ValidationError as e:
            raise ValidationError(f"{where}{_naming(doc)}: {e}" if where not in str(e) else str(e)) from None
        identity = (resource.kind.KIND, resource.namespace, resource.name)
        if identity in seen:
            raise ValidationError(f"{where}: {resource.describe()} appears twice")
        seen.add(identity)
        resources.append(resource)
    if not resources:
        raise ValidationError(f"{source} holds no resources")
    return resources


def _name_namespace(resource: Resource) -> None:
    """A ``kns.<namespace>`` profile holds a Kubernetes namespace's labels: it gets the
    ``kubernetes.io/metadata.name`` label the API server puts on every namespace (whatever value
    the document gave it, as the API server does), so that upstream policies selecting namespaces
    by name work unchanged."""
    from datastore import namespaces
    from datastore.model import check_labels
    from datastore.policy import Profile

    namespace = namespaces.namespace_of(resource.name) if resource.kind is Profile else None
    if namespace is not None:
        labels = namespaces.namespace_labels(namespace, resource.spec.labels_to_apply)
        check_labels(labels, "spec.labelsToApply")  # the namespace's name must be a label value
        resource.spec.labels_to_apply = labels


def check_fits(resources: Sequence[Resource], source: str, *, with_values: bool = True,
               limits: TxnLimits | None = None) -> None:
    """Refuse, before anything is written, a file that etcd would not take as one transaction.

    A file is written all or nothing, so it must fit etcd's limits on one request; splitting it
    would give up atomicity. ``with_values`` False: only keys are written (a delete).
    ``limits``: etcd's defaults (``ETCD_DEFAULT_LIMITS``) unless given.
    """
    from datastore.kv import ETCD_DEFAULT_LIMITS
    from datastore.store import ResourceStore

    limits = limits or ETCD_DEFAULT_LIMITS
    if len(resources) > limits.max_ops:
        raise UserError(
            f"{source} holds {len(resources)} resources; one etcd transaction takes at most {limits.max_ops} "
            "(its --max-txn-ops) and a file is written all or nothing, so split it into several files")
    if not with_values:
        return
    total = 0
    for n, resource in enumerate(resources, start=1):
        size = ResourceStore.write_size(resource)
        if size > limits.max_bytes:
            raise UserError(
                f"{source} document {n} ({resource.kind.KIND} {resource.name}) is {_mib(size)} stored; etcd "
                f"takes at most {_mib(limits.max_request_bytes)} in one request (its --max-request-bytes): "
                "make the resource smaller or split it in several")
        total += size
    if total > limits.max_bytes:
        raise UserError(
            f"the {len(resources)} resources of {source} are {_mib(total)} together; etcd takes at most "
            f"{_mib(limits.max_request_bytes)} in one transaction (its --max-request-bytes) and a file is "
            "written all or nothing, so split it into several files")


def _mib(size: int) -> str:
    return f"{size / 1048576:.2f} MiB ({size} bytes)"


def _naming(doc: Any) -> str:
    if isinstance(doc, Mapping) and isinstance(doc.get("metadata"), Mapping):
        return f" ({doc.get('kind')} {doc['metadata'].get('name')})"
    return ""


def label(resource: Resource) -> str:
    """``ippool/default-ipv4``; ``workloadendpoint/NS/NAME`` for namespaced kinds."""
    ns = f"{resource.namespace}/" if resource.kind.NAMESPACED and resource.namespace else ""
    return f"{resource.kind.KIND.lower()}/{ns}{resource.name}"


def check_pools(resources: Sequence[Resource], stored: Mapping[str, Resource]) -> None:
    """Refuse pool changes that overlap another pool or change an existing pool's CIDR or block size.

    ``stored`` is every stored IPPool by name; the file's pools replace stored ones of the same name.
    """
    from datastore.resources import IPPool
    from ipam.pools import Pool, check_pool_change

    incoming = {r.name: Pool.from_resource(r) for r in resources if r.kind is IPPool}
    after = {name: Pool.from_resource(r) for name, r in stored.items()} | incoming
    for name, pool in incoming.items():
        old = stored.get(name)
        check_pool_change(pool, Pool.from_resource(old) if old else None,
                          [p for other, p in after.items() if other != name])


# ---- commands ----------------------------------------------------------------------------------


def run_write(args: argparse.Namespace) -> int:
    from datastore.references import check_references
    from datastore.resources import IPPool
    from datastore.store import ResourceStore

    text, source = read_source(args.filename)
    resources = decode_all(text, source)
    check_fits(resources, source)
    store = ResourceStore(args.connect())
    current = store.get_each(resources)
    for r, old in zip(resources, current, strict=True):
        if args.verb == "create" and old is not None:
            raise AlreadyExists(r.describe())
        if args.verb == "replace" and old is None:
            raise NotFound(r.describe())
        check_references(r, store, resources)  # e.g. a BGPPeer naming a node that does not exist
    if any(r.kind is IPPool for r in resources):
        check_pools(resources, {p.name: p for p in store.list(IPPool)})
    # One transaction: a conflict or a refusal of any document leaves every key as it was.
    outcomes = store.write_all(list(zip(resources, current, strict=True)))
    for r, outcome in zip(resources, outcomes, strict=True):
        print(f"{label(r)} {outcome}")
    return 0


def run_delete(args: argparse.Namespace) -> int:
    from datastore.resources import Node, kind_named
    from datastore.store import ResourceStore
    from ipam.nodes import remove_node

    parser: argparse.ArgumentParser = args.parser
    if args.filename and (args.kind or args.namespace):
        parser.error("give either -f FILE or KIND NAME, not both")
    if not args.filename and not (args.kind and args.name):
        parser.error("give -f FILE, or KIND and NAME")
    if args.filename:
        text, source = read_source(args.filename)
        in_file = decode_all(text, source)
        check_fits(in_file, source, with_values=False)
        targets = [(r.kind, r.name, r.namespace) for r in in_file]
    else:
        kind = kind_named(args.kind)
        targets = [(kind, args.name, _namespace(kind, args.namespace))]
    store = ResourceStore(args.connect())
    found = [store.get(kind, name, ns) for kind, name, ns in targets]
    missing = [f"{kind.KIND} {ns + '/' if ns else ''}{name}"
               for (kind, name, ns), r in zip(targets, found, strict=True) if r is None]
    if missing:
        raise NotFound(", ".join(missing))
    present = [r for r in found if r is not None]
    # One transaction, each key at the revision just read: all go, or none does.
    store.delete_all(present)
    for resource in present:
        print(f"{label(resource)} deleted")
        if resource.kind is Node:
            # As Calico does: a deleted node's endpoints, addresses and blocks go back.
            removal = remove_node(store.client, resource.name)
            if removal.endpoints or removal.handles or removal.blocks_deleted or removal.blocks_orphaned:
                print(f"  released {len(removal.endpoints)} endpoint(s), {len(removal.handles)} other "
                      f"handle(s), {len(removal.blocks_deleted)} block(s)")
    return 0


def _namespace(kind: type[Kind], namespace: str | None) -> str | None:
    return (namespace or "default") if kind.NAMESPACED else None


def run_get(args: argparse.Namespace) -> int:
    from datastore.codec import dump
    from datastore.resources import kind_named
    from datastore.store import ResourceStore

    parser: argparse.ArgumentParser = args.parser
    if args.name and args.all_namespaces:
        parser.error("-A cannot be used with a NAME")
    kind = kind_named(args.kind)
    store = ResourceStore(args.connect())
    if args.name:
        namespace = _namespace(kind, args.namespace)
        found = store.get(kind, args.name, namespace)
        if found is None:
            raise NotFound(f"{kind.KIND} {namespace + '/' if namespace else ''}{args.name}")
        resources = [found]
    else:
        ns = None if args.all_namespaces else _namespace(kind, args.namespace)
        resources = sorted(store.list(kind, ns), key=lambda r: (r.namespace or "", r.name))
    if args.output in ("yaml", "json"):
        sys.stdout.write(dump(resources, args.output, single=bool(args.name)))
    elif resources:
        sys.stdout.write(render_table(*table(kind, resources, wide=args.output == "wide")))
    else:
        where = "" if not kind.NAMESPACED else " in any namespace" if args.all_namespaces else \
            f" in namespace {_namespace(kind, args.namespace)}"
        print(f"No {kind.KIND} resources found{where}.", file=sys.stderr)
    return 0


# ---- tables ------------------------------------------------------------------------------------


def table(kind: type[Kind], resources: Iterable[Resource], *, wide: bool = False
          ) -> tuple[list[str], list[list[str]]]:
    """Headers and rows for ``get -o table|wide``: NAMESPACE (namespaced kinds), NAME, the kind's columns."""
    from datastore.model import encode_fields

    columns = (kind.WIDE or kind.TABLE) if wide else kind.TABLE
    headers = (["NAMESPACE"] if kind.NAMESPACED else []) + ["NAME"] + [c for c, _ in columns]
    rows = []
    for r in resources:
        spec = encode_fields(r.spec, keep_defaults=True)
        row = ([r.namespace or ""] if kind.NAMESPACED else []) + [r.name]
        rows.append(row + [cell(lookup(spec, path)) for _, path in columns])
    return headers, rows


def lookup(doc: Mapping[str, Any], path: str) -> Any:
    """The value at a dotted path of a camelCase document; None where a step is missing."""
    value: Any = doc
    for step in path.split("."):
        if not isinstance(value, Mapping):
            return None
        value = value.get(step)
    return value


def cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(cell(v) for v in value)
    if isinstance(value, Mapping):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns left-aligned, three spaces apart, as kubectl and calicoctl print them."""
    lines = [list(headers), *(list(r) for r in rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(headers))]
    return "".join("   ".join(v.ljust(w) for v, w in zip(line, widths, strict=True)).rstrip() + "\n"
                   for line in lines)
