"""Which policies and profiles are active on this node, with their rules and IP sets (Felix's
ActiveRulesCalculator).

Owns every policy's and profile's converted rules (``felix_agent.calc.policy.convert``), the count
of local endpoints each applies to, and from it the :class:`~felix_agent.calc.model.Policy` s that
are output (those applying to some local endpoint) and the IP sets they reference (a set is active
while some active policy uses it). It registers the sets a rule references with the
:class:`~felix_agent.calc.selector_index.SelectorIndex`, which resolves their members. It must not
decide which endpoints a policy applies to (``policy_resolver`` tells it, through :meth:`use`).
Pure: no I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from datastore.model import Resource
from felix_agent.calc.model import Policy
from felix_agent.calc.outputs import Outputs
from felix_agent.calc.policy import SetTable, convert, policy_id
from felix_agent.calc.selector_index import SelectorIndex


class ActiveRules:
    """Rules by policy id, and which of them (and of their IP sets) local endpoints use."""

    def __init__(self, index: SelectorIndex) -> None:
        self._index = index
        self._rules: dict[str, tuple[Policy, tuple[str, ...]]] = {}  # pid → rules and the set ids they use
        self._users: Counter[str] = Counter()  # pid → local endpoints it applies to
        self.set_users: Counter[str] = Counter()  # set id → active policies using it
        self.dirty_sets: set[str] = set()  # set ids that became active or inactive
        self._dirty_pids: set[str] = set()
        self._out: Outputs[Policy] = Outputs()

    def add_policy(self, resource: Resource) -> str:
        """Convert a NetworkPolicy or GlobalNetworkPolicy (not yet used by any endpoint); its id."""
        sets = SetTable()
        pid = policy_id(resource)
        self._rules[pid] = (convert(resource, sets), tuple(sets.specs))
        for spec in sets.specs.values():
            self._index.register_spec(spec)
        return pid

    def remove_policy(self, pid: str) -> None:
        """Forget a policy no endpoint uses any more."""
        for set_id in self._rules.pop(pid)[1]:
            self._index.release_spec(set_id)

    def profile(self, pid: str, make: Callable[[SetTable], Policy]) -> str:
        """A profile's rules, converted once (a change of profiles builds a new graph); its id."""
        if pid not in self._rules:
            sets = SetTable()
            self._rules[pid] = (make(sets), tuple(sets.specs))
            for spec in sets.specs.values():
                self._index.register_spec(spec)
        return pid

    def use(self, pid: str, delta: int) -> None:
        """``delta`` local endpoints more (or fewer) use ``pid``; a policy in use is output, with its sets."""
        before = self._users[pid]
        after = before + delta
        if after:
            self._users[pid] = after
        else:
            del self._users[pid]
        if (before == 0) == (after == 0):
            return
        self._dirty_pids.add(pid)
        for set_id in self._rules[pid][1]:
            self.set_users[set_id] += delta
            if not self.set_users[set_id]:
                del self.set_users[set_id]
            self.dirty_sets.add(set_id)

    def policies(self) -> frozenset[Policy]:
        """The active policies and profiles; unchanged ones are the objects handed out last time."""
        result = self._out.replace(self._dirty_pids,
                                   lambda pid: self._rules[pid][0] if pid in self._users else None)
        self._dirty_pids = set()
        return result

    def take_dirty_sets(self) -> set[str]:
        """The set ids whose activity changed since the last call."""
        dirty, self.dirty_sets = self.dirty_sets, set()
        return dirty
