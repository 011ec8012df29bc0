"""The nftables driver's diff: the transaction that turns what the kernel holds (a view) into what
the owners declared, as ``nft`` script lines and as the same commands for ``kernel.nfnl_batch``.

Owns the order of a transaction (objects made, elements out, elements in, rules, objects dropped:
an order nft and the kernel accept) and when only recreating the table can do it. Pure: must not
run ``nft`` or talk to the kernel (``felix_agent.dataplane.nftables`` does).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

from felix_agent.dataplane.nft_ruleset import Chain, Map, Set
from kernel import nfnl_batch

ELEMENT_CHUNK = 1000  # elements per "add element" line


@dataclass
class _View:
    """What the kernel holds (as read back, or as last written): chain signatures, sets, maps."""

    chains: dict[str, tuple[tuple[str, str, int, str] | None, tuple[str, ...]]] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    maps: dict[str, Map] = field(default_factory=dict)


@dataclass
class _Desired:
    chains: dict[str, Chain] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    maps: dict[str, Map] = field(default_factory=dict)


def _diff(t: str, want: _Desired, have: _View, sweep: bool, chains_known: bool = False) -> list[str] | None:
    """The transaction that turns ``have`` into ``want``, in an order nft accepts; None when only
    recreating the table can do it. ``chains_known``: ``have`` holds exactly ``want``'s chains."""
    planned = _plan(t, want, have, sweep, chains_known)
    return None if planned is None else planned[0]


def _plan(t: str, want: _Desired, have: _View, sweep: bool, chains_known: bool = False,
          only: Collection[str] | None = None) -> tuple[list[str], list[nfnl_batch.Op | None]] | None:
    """``_diff``'s script, and the same transaction as nfnetlink operations in the same order (None
    for a command only nft writes: a set, a map, a base chain), for :meth:`NftTable._write_direct`.
    ``only`` (with ``chains_known``): ``have`` holds ``want``'s chains but for the ones so named."""
    make: list[str] = []
    elements_out: list[str] = []
    elements_in: list[str] = []
    rules: list[str] = []
    make_ops: list[nfnl_batch.Op | None] = []
    out_ops: list[nfnl_batch.Op | None] = []
    in_ops: list[nfnl_batch.Op | None] = []
    rule_ops: list[nfnl_batch.Op | None] = []
    for s in want.sets.values():
        old_set = have.sets.get(s.name)
        if old_set is not None and old_set.spec != s.spec:
            return None
        if old_set is None:
            make.append(f"add set {t} {s.name} {s.render()}")
            make_ops.append(None)
        if old_set is None or old_set.elements is not s.elements:
            old_elements = old_set.elements if old_set is not None else frozenset()
            interval = "interval" in s.flags
            if gone := sorted(old_elements - s.elements):
                elements_out += _elements("delete", t, s.name, gone)
                out_ops.append(nfnl_batch.SetElements(("delete", s.name, s.type, interval, gone)))
            if new := sorted(s.elements - old_elements):
                elements_in += _elements("add", t, s.name, new)
                in_ops.append(nfnl_batch.SetElements(("add", s.name, s.type, interval, new)))
    for m in want.maps.values():
        old_map = have.maps.get(m.name)
        if old_map is not None and old_map.spec != m.spec:
            return None
        if old_map is None:
            make.append(f"add map {t} {m.name} {m.render()}")
            make_ops.append(None)
        if old_map is None or old_map.elements is not m.elements:
            old_pairs = old_map.elements if old_map is not None else frozenset()
            direct = m.key_type == "ifname" and m.value_type == "verdict"
            if gone_pairs := sorted(old_pairs - m.elements):
                elements_out += _elements("delete", t, m.name, [k for k, _ in gone_pairs])
                out_ops.append(nfnl_batch.MapElements("delete", m.name, tuple(gone_pairs)) if direct else None)
            if new_pairs := sorted(m.elements - old_pairs):
                elements_in += _elements("add", t, m.name, [f"{k} : {v}" for k, v in new_pairs])
                in_ops.append(nfnl_batch.MapElements("add", m.name, tuple(new_pairs)) if direct else None)
    if not chains_known:
        candidates: Iterable[Chain] = want.chains.values()
    else:
        candidates = [want.chains[name] for name in only or () if name in want.chains]
    for c in candidates:
        old_chain = have.chains.get(c.name)
        if old_chain is c.signature:
            continue  # the common case: the very chain written last time
        if old_chain is not None and old_chain[0] != c.signature[0]:
            return None
        if old_chain == c.signature:
            continue
        if old_chain is None:
            make.append(f"add chain {t} {c.name}" + (f" {c.hook.render()}" if c.hook else ""))
            make_ops.append(None if c.hook else nfnl_batch.AddChain(c.name))
        elif old_chain[1]:
            rules.append(f"flush chain {t} {c.name}")
            rule_ops.append(nfnl_batch.FlushChain(c.name))
        rules += (f"add rule {t} {c.name} {r.render()}" for r in c.rules)
        rule_ops += (nfnl_batch.AddRule(c.name, r.body, r.comment_text) for r in c.rules)
    drop: list[str] = []
    drop_ops: list[nfnl_batch.Op | None] = []
    if sweep:
        if chains_known:
            leaving = {name for name in only or () if name not in want.chains and name in have.chains}
            gone_chains = [name for name in have.chains if name in leaving] if leaving else []  # in the view's order
        else:
            gone_chains = [name for name in have.chains if name not in want.chains]
        # rules first (they reference sets, maps and chains), then sets and maps (maps reference chains)
        drop += [f"flush chain {t} {name}" for name in gone_chains]
        drop_ops += [nfnl_batch.FlushChain(name) for name in gone_chains]
        drop += [f"delete set {t} {name}" for name in have.sets if name not in want.sets]
        drop += [f"delete map {t} {name}" for name in have.maps if name not in want.maps]
        drop_ops += [None] * (len(drop) - len(drop_ops))
        drop += [f"delete chain {t} {name}" for name in gone_chains]
        drop_ops += [nfnl_batch.DeleteChain(name) for name in gone_chains]
    body = make + elements_out + elements_in + rules + drop
    ops = make_ops + out_ops + in_ops + rule_ops + drop_ops
    return ([f"add table {t}", *body], ops) if body else ([], [])


def _recreate(t: str, want: _Desired) -> list[str]:
    script = [f"add table {t}", f"delete table {t}"]
    script += _diff(t, want, _View(), False) or [f"add table {t}"]
    return script


def _elements(verb: str, t: str, name: str, items: Sequence[str]) -> Iterator[str]:
    for start in range(0, len(items), ELEMENT_CHUNK):
        yield f"{verb} element {t} {name} {{ {', '.join(items[start : start + ELEMENT_CHUNK])} }}"
