"""ExaBGP as the speaker runs it: ``python -m bgp.exabgp_reactor server CONFIG`` is ``exabgp server
CONFIG`` with one repair to its reactor's poller. Must not change what ExaBGP says or does on the
wire; it only decides when its loop wakes up.

The repair: ExaBGP 5.0.15 registers a peer's socket in its ``poll()`` object when the peer waits
for data, and never unregisters it when that connection is closed (a collision, a neighbour a
configuration reload changed, an outgoing attempt to a passive peer). From then on every
``poll()`` returns at once with POLLNVAL for the dead descriptor; the reactor takes that for a
spinning loop and sleeps its idle period (``exabgp.reactor.speed`` / 100 s) on every turn. Every
UPDATE such an ExaBGP sends or receives then waits for that sleep: measured in the BGP benchmark's
lab, two of ten ExaBGPs in that state after start-up, their routes 60-80 ms behind the others'
(speed 10) or ~10 ms (speed 1). Here a descriptor reported closed is unregistered, and the rest of
what ``poll()`` reported is returned as usual; ExaBGP registers a new connection's socket itself.

The rest is for a large table received (10,000 routes from an external peer), where ExaBGP's CPU
per NLRI is on the route's way; each gives what ExaBGP's own code gives, with less work per NLRI:
debug log calls return at once while debug logging is off (``quiet_debug``: ExaBGP makes one per
received NLRI and walked its logger to drop it); a received UPDATE's JSON is written without a
``Family`` per plain unicast NLRI, the same text character for character (``fast_update_json``);
the decoder finds an NLRI's class once per family and builds a plain unicast prefix's object
without INET's label and RD checks (``fast_nlri_decoding``). The fixed costs per
command and per UPDATE sent (callbacks without an event loop, turns for the peers with work,
lighter RIB copies, one build of an UPDATE for the peers that negotiated the same, the listening
sockets and API processes checked when due rather than on every wake-up, no turn after a message
read that would only find nothing to read) are
``bgp.exabgp_turns``'s, applied here too.
"""

from __future__ import annotations

import contextlib
import select
import sys
from pathlib import Path
from socket import AF_INET, AF_INET6
from socket import inet_ntop as ntop
from typing import Any

from bgp.exabgp_turns import (
    light_injection,
    no_empty_turns,
    peers_with_work,
    quiet_wakeups,
    shared_update_bytes,
    synchronous_callbacks,
)


class ClosedDescriptorsDropped:
    """A ``select.poll()`` object that unregisters what it reports as closed (POLLNVAL) instead of
    reporting it on every call; unregistering a descriptor it already dropped is not an error."""

    def __init__(self, poller: Any = None) -> None:
        self._poll = poller if poller is not None else select.poll()

    def register(self, fd: int, mask: int = select.POLLIN | select.POLLPRI | select.POLLOUT) -> None:
        self._poll.register(fd, mask)

    def modify(self, fd: int, mask: int) -> None:
        self._poll.modify(fd, mask)

    def unregister(self, fd: int) -> None:
        with contextlib.suppress(KeyError):
            self._poll.unregister(fd)

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        events: list[tuple[int, int]] = self._poll.poll(timeout)
        closed = [fd for fd, event in events if event & select.POLLNVAL]
        if not closed:
            return events
        for fd in closed:
            self.unregister(fd)
        live = [(fd, event) for fd, event in events if not event & select.POLLNVAL]
        # Only dead descriptors woke us: wait again, as the loop asked, for the living ones.
        return live if live else list(self._poll.poll(timeout))


def patch_reactor() -> None:
    """Give every ExaBGP reactor made from now on the repaired poller. An ExaBGP whose reactor is
    shaped otherwise (another 5.x release) runs as it is: the repair is for speed, never needed."""
    try:
        from exabgp.reactor.loop import Reactor
    except ImportError:
        return

    made = Reactor.__init__

    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        made(self, *args, **kwargs)
        poller = getattr(self, "_poller", None)
        if poller is not None and hasattr(poller, "poll"):
            self._poller = ClosedDescriptorsDropped(poller)

    Reactor.__init__ = __init__


def quiet_debug() -> None:
    """ExaBGP's ``log.debug`` returns at once while debug logging is off (``option.logit``, set
    from ``exabgp.log.level`` once ExaBGP has read its environment): it is called per received
    NLRI. With debug on, it logs as before."""
    try:
        from exabgp.logger import _log
        from exabgp.logger.option import option
    except ImportError:
        return
    made = _log.__dict__["debug"].__func__  # unbound: ``log.debug`` must log through ``log``'s logger

    def debug(cls: Any, message: Any, source: str = "", level: str = "DEBUG") -> None:
        if option.logit.get("DEBUG", False):
            made(cls, message, source, level)

    _log.debug = classmethod(debug)


def fast_update_json() -> None:
    """ExaBGP's JSON for an UPDATE (``JSON._update``), written the same but quicker for plain
    unicast NLRIs (class ``INET`` without a path ID): their text is ``{ "nlri": "<prefix>" }``,
    the family and next hop keys are taken once per object, not rebuilt per NLRI. Anything else
    (add-path, labels, VPN, flow, an EOR) goes through ExaBGP's own ``json()`` as before."""
    try:
        from exabgp.bgp.message import Action
        from exabgp.bgp.message.update.nlri.inet import INET
        from exabgp.bgp.message.update.nlri.qualifier.path import PathInfo
        from exabgp.reactor.api.response.json import JSON
    except ImportError:
        return
    announce, withdraw = Action.ANNOUNCE, Action.WITHDRAW

    def _update(self: Any, update: Any) -> dict[str, Any]:
        nlris = update.nlris
        plus: dict[str, dict[str, list[str]]] = {}
        minus: dict[str, list[str]] = {}
        families: dict[tuple[int, int], str] = {}
        hops: dict[int, str] = {}
        nopath, compact = PathInfo.NOPATH, self.compact
        for nlri in nlris:
            action = nlri.action
            if action != announce and action != withdraw:
                continue
            key = (id(nlri.afi), id(nlri.safi))
            family = families.get(key)
            if family is None:
                afi, safi = nlri.family().afi_safi()
                family = families[key] = f"{afi} {safi}"
            if type(nlri) is INET and nlri.path_info is nopath:
                cidr = nlri.cidr  # CIDR.prefix(), without its two calls per NLRI
                packed = cidr._packed
                prefix = f"{cidr._ip or ntop(AF_INET if len(packed) == 4 else AF_INET6, packed)}/{cidr.mask}"
                text = f'{{ "nlri": "{prefix}" }}' if not compact else f'"{prefix}"'
            else:
                text = nlri.json(compact=compact)
            if action == announce:
                hop = hops.get(id(nlri.nexthop))
                if hop is None:
                    try:
                        hop = str(nlri.nexthop)
                    except Exception:
                        hop = "null"
                    hops[id(nlri.nexthop)] = hop
                plus.setdefault(family, {}).setdefault(hop, []).append(text)
            else:
                minus.setdefault(family, []).append(text)
        if not plus and not minus and nlris:  # an EOR, whose json() is already an object
            return {"message": self._json(nlris[0].json())}
        add = ", ".join(f'"{family}": {{ '
                        + ", ".join(f'"{hop}": [ {", ".join(texts)} ]' for hop, texts in by_hop.items()) + " }"
                        for family, by_hop in plus.items())
        remove = ", ".join(f'"{family}": [ {", ".join(texts)} ]' for family, texts in minus.items())
        nlri_text = ""
        if add:
            nlri_text += f'"announce": {{ {add} }}'
        if add and remove:
            nlri_text += ", "
        if remove:
            nlri_text += f'"withdraw": {{ {remove} }}'
        attributes = "" if not update.attributes else f'"attribute": {{ {update.attributes.json()} }}'
        if not attributes or not nlri_text:
            body = f'"update": {{ {attributes}{nlri_text} }}'
        else:
            body = f'"update": {{ {attributes}, {nlri_text} }}'
        return {"message": self._json(f"{{ {body} }}")}

    JSON._update = _update


def fast_nlri_decoding() -> None:
    """Less work per received NLRI in ExaBGP's decoder, the same objects out:

    - ``NLRI.unpack_nlri`` finds the class of a family once, not per NLRI (it made two family
      objects, a debug record and a "ipv4/unicast" key for each), while debug logging is off;
    - a plain IPv4/IPv6 unicast or multicast prefix (INET, no path ID) is built as
      ``INET.unpack_nlri`` builds it, without its walk through the label and RD checks that do
      not apply to those families (a third of the decoder's time for a table of /32s); a mask too
      long or data cut short goes through ``INET.unpack_nlri``, which refuses it as before;
    - ``AFI.create`` / ``SAFI.create`` return the cached object without first building the one
      they return only on a miss;
    - ``Peer.id`` (its log tag, made for a debug call per received NLRI) is made once per
      neighbor object."""
    try:
        from exabgp.bgp.message.update.nlri.cidr import CIDR
        from exabgp.bgp.message.update.nlri.inet import INET
        from exabgp.bgp.message.update.nlri.nlri import NLRI
        from exabgp.bgp.message.update.nlri.qualifier.path import PathInfo
        from exabgp.logger.option import option
        from exabgp.protocol.family import _AFI, _SAFI, AFI, SAFI
        from exabgp.protocol.ip import NoNextHop
        from exabgp.reactor.peer import Peer
    except ImportError:
        return
    made = NLRI.unpack_nlri.__func__
    classes: dict[tuple[int, int], tuple[Any, Any, Any, int]] = {}
    plain = {(AFI.ipv4, SAFI.unicast): 32, (AFI.ipv6, SAFI.unicast): 128,
             (AFI.ipv4, SAFI.multicast): 32, (AFI.ipv6, SAFI.multicast): 128}
    nopath, cidr, nonexthop = PathInfo.NOPATH, CIDR, NoNextHop

    def unpack_nlri(cls: Any, afi: Any, safi: Any, data: bytes, action: Any, addpath: Any) -> Any:
        found = classes.get((afi, safi))
        if found is None or option.logit.get("DEBUG", False):
            nlri = made(cls, afi, safi, data, action, addpath)  # raises for a family nobody decodes
            a, s = AFI.create(afi), SAFI.create(safi)
            klass = NLRI.registered_nlri[f"{a}/{s}"]
            classes[(afi, safi)] = (klass, a, s, plain.get((a, s), 0) if klass is INET else 0)
            return nlri
        klass, a, s, bits = found
        if bits and not addpath and data:
            # A plain prefix (INET without labels, RD or path ID): INET.unpack_nlri's object,
            # built without its label and RD checks. Anything it would refuse goes through it.
            mask = data[0]
            size = (mask + 7) >> 3
            if mask <= bits and len(data) > size:
                nlri = INET.__new__(INET)
                nlri.afi, nlri.safi, nlri.action = a, s, action
                nlri.path_info = nopath
                nlri.cidr = cidr(data[1:size + 1] + bytes((bits >> 3) - size), mask)
                nlri.nexthop = nonexthop
                return nlri, data[size + 1:]
        return klass.unpack_nlri(a, s, data, action, addpath)

    NLRI.unpack_nlri = classmethod(unpack_nlri)

    def cached(cache: dict[int, Any], make: Any) -> Any:
        def create(cls: Any, value: int) -> Any:
            found = cache.get(value)
            return found if found is not None else make(value)
        return classmethod(create)

    AFI.create = cached(AFI.cache, _AFI)
    SAFI.create = cached(SAFI.cache, _SAFI)

    def peer_id(self: Any) -> str:
        tag: tuple[Any, str] | None = self.__dict__.get("_tortie_id")
        if tag is None or tag[0] is not self.neighbor:
            tag = self.__dict__["_tortie_id"] = (self.neighbor, f"peer-{self.neighbor.uid}")
        return tag[1]

    Peer.id = peer_id


def main() -> int:
    patch_reactor()
    quiet_debug()
    fast_update_json()
    fast_nlri_decoding()
    synchronous_callbacks()  # bgp.exabgp_turns: the fixed costs per command and per UPDATE sent
    light_injection()
    no_empty_turns()  # before peers_with_work: its turns follow the actions this one returns
    peers_with_work()
    shared_update_bytes()
    quiet_wakeups()
    from exabgp.application.main import main as exabgp_main

    # ExaBGP runs `sys.executable sys.argv[0]` for its CLI pipe helper: the plain `exabgp` script
    # beside the interpreter (the helper has no reactor to repair).
    script = Path(sys.executable).parent / "exabgp"
    sys.argv[0] = str(script) if script.exists() else "exabgp"
    return int(exabgp_main() or 0)


if __name__ == "__main__":
    sys.exit(main())
