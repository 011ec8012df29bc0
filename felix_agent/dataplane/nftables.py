"""The nftables driver: one table, read back from the kernel and written in atomic nft transactions.

Owns the table in the kernel; knows nothing about policy or pools. Its callers (*owners*: the policy
manager, the NAT-outgoing manager) each declare the chains, sets and verdict maps they want
(``felix_agent.dataplane.nft_ruleset``), by name; ``apply()`` merges the declarations, diffs them
against what the kernel holds and writes the difference as one transaction: set and map elements are
added or deleted without touching any rule; a chain whose rules changed is flushed and rewritten;
objects nobody declares any more are deleted after the rules that referenced them. What it cannot
diff (a set whose type changed, a base chain whose hook changed, a transaction the kernel refused)
is repaired by recreating the whole table in one transaction, so the kernel never sees a
half-written table.

The kernel is the record: every rule carries a comment starting with a hash of its text, so a
restarted agent (or a periodic ``reload()``) recognises its own rules, and a rule edited or
deleted by hand shows up as a chain to rewrite. Between reloads the driver trusts its own view of
what it last wrote, so an apply costs one ``nft`` transaction, not a read and a write. In its own
namespace it runs nft's commands through libnftables (see libnft), not one ``nft`` process each,
and a transaction of elements, regular chains and simple rules (a label change, a new or deleted
pod) straight over nfnetlink (``kernel.nfnl_batch``): libnftables loads its cache of the whole
ruleset first. An owner's ``Ruleset.delta`` lets it merge, diff and remember only the chains that
changed; a background read overtaken by our own transactions is kept, those replayed onto it.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from felix_agent.dataplane import libnft
from felix_agent.dataplane.nft_diff import _Desired, _plan, _recreate, _View
from felix_agent.dataplane.nft_ruleset import Chain, ChainDelta, Map, Ruleset, Set
from kernel import nfnl, nfnl_batch
from kernel.netlink import KernelError

log = logging.getLogger(__name__)
# The agent may be started with a bare environment (a lab, a minimal unit file): find nft anyway.
NFT = shutil.which("nft") or shutil.which("nft", path="/usr/sbin:/sbin:/usr/bin:/bin") or "nft"

Runner = Callable[[Sequence[str], str | None], subprocess.CompletedProcess[str]]



class NftError(Exception):
    """``nft`` refused a command; the message carries nft's own diagnosis (the offending line)."""


def nft_runner(netns: str | None = None) -> Runner:
    """Run the real ``nft``, inside the named network namespace when ``netns`` is given."""
    prefix = ["ip", "netns", "exec", netns, NFT] if netns else [NFT]

    def run(args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run([*prefix, *args], input=stdin, capture_output=True, text=True, check=False)
        except FileNotFoundError as err:
            return subprocess.CompletedProcess([*prefix, *args], 127, "", f"{err.filename} is not installed (nftables)")

    return run


class NftTable:
    """One nftables table, shared by the owners that declare parts of it."""

    def __init__(
        self, family: str = "inet", name: str = "tortie", run: Runner | None = None, netns: str | None = None,
        direct: bool | None = None,
    ) -> None:
        self.family, self.name = family, name
        # Talk nfnetlink ourselves for set elements and the rules' read-back (see kernel.nfnl): only in
        # our own namespace with the real nft, i.e. in the agent; tests with a runner or a netns do not.
        self._direct = (run is None and netns is None) if direct is None else direct
        if run is None and netns is None:  # our own namespace: the library, without a process per call
            library = libnft.runner()
            run = library.run if library is not None else None
        self._run = run or nft_runner(netns)
        self._owners: dict[str, Ruleset | None] = {}
        self._view: _View | None = None  # None: read the kernel before the next diff
        # The owners' chain tuples merged last time, and the merged dict (reused while they are the same).
        self._merged_chains: tuple[tuple[tuple[Chain, ...], ...], dict[str, Chain]] | None = None
        # The merged chains dict the view is known to hold exactly (None: compare chain by chain), but for
        # the chains named in _dirty_chains: an owner's ChainDelta changed them in that dict in place.
        self._synced_chains: dict[str, Chain] | None = None
        self._dirty_chains: set[str] = set()
        self._chain_owner: dict[str, str] = {}  # merged chain name -> the owner declaring it
        self.reloads = 0  # read-backs begun (reload, reload_async): owners share one resync's read
        self._writes = 0  # successful transactions: a read-back begun before one may have missed it
        self._pending: _Read | None = None
        # One nfnetlink socket for every direct transaction: closing one after a transaction that
        # deleted something waits ~10 ms for the kernel (kernel.nfnl.KeptSocket), which the loop and
        # the ADDs waiting for it would pay on every pod's removal.
        self._socket = nfnl.KeptSocket() if self._direct else None

    def add_owner(self, owner: str) -> None:
        """Announce an owner: until every announced owner has declared, objects nobody declares are kept
        (so the first manager to apply after a restart does not delete the others' chains)."""
        self._owners.setdefault(owner, None)

    def declare(self, owner: str, ruleset: Ruleset) -> None:
        """Record what ``owner`` wants in the table; no kernel I/O."""
        self._owners[owner] = ruleset

    def reload(self) -> None:
        """Read the kernel back now, so that the next ``apply()`` repairs out-of-band changes."""
        self._view = self.read()
        self._synced_chains = None
        self.reloads += 1

    def reload_async(self, done: Callable[[], None]) -> None:
        """Start reading the kernel back on a thread and call ``done`` (from it) when finished;
        :meth:`adopt_reload` then makes it the view. At 5,000 endpoints the read takes seconds, which
        a new pod's transaction need not wait for."""
        if self._pending is not None and not self._pending.finished.is_set():
            return  # one read at a time
        job = self._pending = _Read(self._writes)
        self.reloads += 1

        def run() -> None:
            try:
                job.view = self.read()
            except Exception as err:  # reported by adopt_reload's caller: the next resync tries again
                job.error = err
            job.finished.set()
            done()

        threading.Thread(target=run, name="nft-read", daemon=True).start()

    def reading(self) -> bool:
        """A background read-back is running or waits to be adopted: whoever adopts it repairs."""
        return self._pending is not None

    def read_finished(self) -> bool:
        return self._pending is not None and self._pending.finished.is_set()

    def adopt_reload(self) -> bool:
        """Take a finished background read as the view: True, unless it failed (then the caller reads
        again). A transaction of ours that ran while it read (a new pod during a resync) may be half
        in it: what that transaction wrote (its journal) overrides the read, so that the read is not
        thrown away for it (at 5,000 endpoints it takes seconds, and churn would overtake every one)."""
        job, self._pending = self._pending, None
        if job is None or not job.finished.is_set() or job.view is None:
            if job is not None and job.error is not None:
                log.warning("reading the table back failed: %s", job.error)
            return False
        if job.writes != self._writes:
            job.journal.replay(job.view)
        self._view = job.view
        self._synced_chains = None
        return True

    def apply(self, rewrite: bool = False) -> str:
        """Write the difference between the declarations and the kernel in one transaction; return its text
        ("" when there was nothing to do). ``rewrite`` recreates the whole table from the declarations
        (the periodic full resync; an owner that has not declared yet loses its objects until it does)."""
        want = self._merged()
        sweep = all(r is not None for r in self._owners.values())
        if not rewrite:
            for attempt in range(2):
                if self._view is None or attempt:
                    self._view = self.read()
                    self._synced_chains = None
                known = want.chains is self._synced_chains
                planned = _plan(self._prefix, want, self._view, sweep, known, self._dirty_chains if known else None)
                if planned is None:
                    break  # something the diff cannot express: fall back to recreating the table
                script, ops = planned
                if not script:
                    return ""
                try:
                    if not self._write_direct(ops):
                        self._transact(script)
                except (NftError, KernelError) as err:
                    log.warning("nft transaction refused, re-reading the table: %s", err)
                    continue
                self._remember(want, sweep)
                return "\n".join(script)
        script = _recreate(self._prefix, want)
        try:
            self._transact(script)
        except NftError:
            self._view = None
            self._synced_chains = None
            raise
        self._view = _View()
        self._synced_chains = None
        self._remember(want, True)
        return "\n".join(script)

    def read(self) -> _View:
        """What the kernel holds in this table (empty when the table does not exist)."""
        if self._direct:
            return self._read_direct()
        done = self._run(["-j", "list", "table", self.family, self.name], None)
        if done.returncode != 0:
            if "Error: No such file or directory" in done.stderr:  # nft's answer for a missing table
                return _View()
            raise NftError(f"nft list table {self.family} {self.name}: {done.stderr.strip()}")
        return _parse(json.loads(done.stdout))

    def _read_direct(self) -> _View:
        """``read()`` without ``nft list table``, whose listing of the rules takes tens of seconds at
        300,000 rules: chains, sets and maps from ``nft -j list``, the rules' tags from nfnl."""
        items: list[Any] = []
        for what in ("chains", "sets", "maps"):
            done = self._run(["-j", "list", what, self.family], None)
            if done.returncode != 0:
                raise NftError(f"nft list {what} {self.family}: {done.stderr.strip()}")
            for item in json.loads(done.stdout).get("nftables", []):
                body: dict[str, Any] = next(iter(item.values()), {})
                if body.get("table") == self.name:
                    items.append(item)
        view = _parse({"nftables": items})
        try:
            tags = nfnl.rule_tags(self.family, self.name, view.chains)
        except KernelError as err:
            raise NftError(f"reading the rules of {self.family} {self.name}: {err}") from err
        view.chains = {name: (hook, tuple(tags.get(name, ()))) for name, (hook, _) in view.chains.items()}
        return view

    def _write_direct(self, ops: Sequence[nfnl_batch.Op | None]) -> bool:
        """Write the transaction straight over nfnetlink when every command of it can be (set and
        map elements, regular chains and the rules of ``kernel.nfnl_batch``'s grammar: a label
        change, a new or deleted endpoint); False when nft must write it. libnftables would first
        load its cache of the whole ruleset: 50-150 ms at 5,000 endpoints."""
        if not self._direct or not ops or any(op is None for op in ops):
            return False
        try:
            nfnl_batch.write(self.family, self.name, [op for op in ops if op is not None], self._socket)
        except nfnl.Unsupported:
            return False
        return True

    @property
    def _prefix(self) -> str:
        return f"{self.family} {self.name}"

    def _merged(self) -> _Desired:
        want = _Desired()
        declared = [(owner, ruleset) for owner, ruleset in self._owners.items() if ruleset is not None]
        chain_tuples = tuple(ruleset.chains for _, ruleset in declared)
        cached = self._merged_chains
        same_chains = cached is not None and len(cached[0]) == len(chain_tuples) and (
            all(a is b for a, b in zip(cached[0], chain_tuples, strict=True)) or self._merge_deltas(declared))
        owners: dict[str, str] = {}
        for owner, ruleset in declared:
            kinds = (("sets", ruleset.sets), ("maps", ruleset.maps))
            for kind, items in kinds if same_chains else (("chains", ruleset.chains), *kinds):
                table: dict[str, Any] = getattr(want, kind)
                for item in items:
                    if item.name in table:
                        raise ValueError(f"{kind[:-1]} {item.name} declared twice (again by {owner})")
                    table[item.name] = item
                    if kind == "chains":
                        owners[item.name] = owner
        if same_chains and self._merged_chains is not None:
            want.chains = self._merged_chains[1]  # the very dict of last time: the diff can skip the chains
        else:
            self._merged_chains = (chain_tuples, want.chains)
            self._chain_owner = owners
        return want

    def _merge_deltas(self, declared: Sequence[tuple[str, Ruleset]]) -> bool:
        """Bring the merged chains up to ``declared`` in place when every owner whose chains changed
        says how (``Ruleset.delta`` from the tuple merged last time), noting the changed names for the
        diff; False (nothing touched) when one does not: then all chains are merged again."""
        assert self._merged_chains is not None
        before, merged = self._merged_chains
        deltas: list[tuple[str, ChainDelta]] = []
        for (owner, ruleset), old in zip(declared, before, strict=True):
            if ruleset.chains is old:
                continue
            if ruleset.delta is None or ruleset.delta.base is not old:
                return False
            deltas.append((owner, ruleset.delta))
        for owner, delta in deltas:
            for chain in delta.upserted:
                if self._chain_owner.get(chain.name, owner) != owner:
                    raise ValueError(f"chain {chain.name} declared twice (again by {owner})")
        for owner, delta in deltas:
            for name in delta.removed:
                if self._chain_owner.get(name) == owner:
                    del merged[name], self._chain_owner[name]
                    self._dirty_chains.add(name)
            for chain in delta.upserted:
                merged[chain.name] = chain
                self._chain_owner[chain.name] = owner
                self._dirty_chains.add(chain.name)
        self._merged_chains = (tuple(ruleset.chains for _, ruleset in declared), merged)
        return True

    def _transact(self, script: list[str]) -> None:
        done = self._run(["-f", "-"], "\n".join(script) + "\n")
        if done.returncode != 0:
            raise NftError(done.stderr.strip() or f"nft -f exited {done.returncode}")

    def _remember(self, want: _Desired, sweep: bool) -> None:
        """After a successful transaction the kernel holds ``want`` (and, without a sweep, the leftovers)."""
        self._writes += 1
        view = self._view if self._view is not None else _View()
        journal = self._pending.journal if self._pending is not None else None  # a read runs: note what changed
        chains_known = want.chains is self._synced_chains
        if sweep:
            if not chains_known:
                for name in [n for n in view.chains if n not in want.chains]:
                    del view.chains[name]
                    if journal is not None:
                        journal.chains[name] = None
            for kind, wanted in (("sets", want.sets), ("maps", want.maps)):
                held: dict[str, Any] = getattr(view, kind)
                gone = [n for n in held if n not in wanted]
                for name in gone:
                    del held[name]
                if journal is not None:
                    getattr(journal, kind).update(dict.fromkeys(gone))
        if not chains_known:
            for name, chain in want.chains.items():
                old = view.chains.get(name)
                if old is not chain.signature:
                    view.chains[name] = chain.signature
                    if journal is not None and old != chain.signature:  # an equal one was not written
                        journal.chains[name] = chain.signature
        else:
            for name in self._dirty_chains:
                declared = want.chains.get(name)
                if declared is not None:
                    view.chains[name] = declared.signature
                elif sweep:
                    view.chains.pop(name, None)
                if journal is not None and (declared is not None or sweep):
                    journal.chains[name] = declared.signature if declared is not None else None
        self._dirty_chains = set()
        for kind, wanted in (("sets", want.sets), ("maps", want.maps)):
            held = getattr(view, kind)
            if journal is not None:
                getattr(journal, kind).update((n, x) for n, x in wanted.items()
                                              if held.get(n) is not x and held.get(n) != x)
            held.update(wanted)
        self._view = view
        # With a sweep the view's chains are now exactly these: next time, the same dict needs no look.
        self._synced_chains = want.chains if sweep else None


@dataclass
class _Journal:
    """What our transactions wrote while a read-back ran, by name (None: deleted)."""

    chains: dict[str, tuple[tuple[str, str, int, str] | None, tuple[str, ...]] | None] = field(default_factory=dict)
    sets: dict[str, Set | None] = field(default_factory=dict)
    maps: dict[str, Map | None] = field(default_factory=dict)

    def replay(self, view: _View) -> None:
        """Make ``view`` (read while these writes ran) hold what they wrote."""
        for kind in ("chains", "sets", "maps"):
            held: dict[str, Any] = getattr(view, kind)
            for name, value in getattr(self, kind).items():
                if value is None:
                    held.pop(name, None)
                else:
                    held[name] = value


@dataclass
class _Read:
    """A read-back running on a thread; ``writes``: the table's transaction count when it began."""

    writes: int
    finished: threading.Event = field(default_factory=threading.Event)
    journal: _Journal = field(default_factory=_Journal)
    view: _View | None = None
    error: Exception | None = None


def _parse(document: dict[str, Any]) -> _View:
    view = _View()
    hooks: dict[str, tuple[str, str, int, str] | None] = {}
    tags: dict[str, list[str]] = {}
    for item in document.get("nftables", []):
        if "chain" in item:
            c = item["chain"]
            hooks[c["name"]] = (c["hook"], c["type"], c["prio"], c.get("policy", "accept")) if "hook" in c else None
            tags.setdefault(c["name"], [])
        elif "rule" in item:
            comment = item["rule"].get("comment", "")
            tags.setdefault(item["rule"]["chain"], []).append(comment.split(" ", 1)[0] if comment else "")
        elif "set" in item:
            s = item["set"]
            kind = s["type"] if isinstance(s["type"], str) else " . ".join(s["type"])
            elements = frozenset(_literal(e, kind) for e in s.get("elem", []))
            view.sets[s["name"]] = Set(s["name"], kind, tuple(s.get("flags", ())), elements)
        elif "map" in item:
            m = item["map"]
            key_type = m["type"] if isinstance(m["type"], str) else " . ".join(m["type"])
            pairs = frozenset((_literal(k, key_type), _verdict(v)) for k, v in m.get("elem", []))
            view.maps[m["name"]] = Map(m["name"], key_type, m["map"], pairs)
    view.chains = {name: (hooks.get(name), tuple(found)) for name, found in tags.items()}
    return view


def _literal(element: Any, kind: str) -> str:
    """An element of nft's JSON as the literal nft's text syntax uses (and Set.elements holds)."""
    if isinstance(element, dict):
        if "elem" in element:
            return _literal(element["elem"]["val"], kind)
        if "prefix" in element:
            return f"{element['prefix']['addr']}/{element['prefix']['len']}"
        if "range" in element:
            return "-".join(str(v) for v in element["range"])
        if "concat" in element:
            return " . ".join(_literal(v, "") for v in element["concat"])
    if isinstance(element, str) and kind in ("ifname", "string"):
        return f'"{element}"'
    return str(element)


def _verdict(value: Any) -> str:
    if isinstance(value, dict) and len(value) == 1:
        verb, arg = next(iter(value.items()))
        return f"{verb} {arg['target']}" if isinstance(arg, dict) else str(verb)
    return str(value)
