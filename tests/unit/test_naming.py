"""Host-side interface names: the CONTRACT's formula, stable and within IFNAMSIZ."""

from __future__ import annotations

import hashlib
import re

from hypothesis import given
from hypothesis import strategies as st

from cni_plugins.naming import host_ifname


def test_matches_the_contract_formula() -> None:
    expected = "tor" + hashlib.sha1(b"tortie-net.abc123.eth0").hexdigest()[:11]
    assert host_ifname("tortie-net", "abc123", "eth0") == expected


def test_known_value_is_stable_across_releases() -> None:
    # Pinned: a changed name would orphan the host ends of running containers on upgrade.
    assert host_ifname("tortie-net", "abc123", "eth0") == "torb9c2ab5be17"


@given(st.text(max_size=40), st.text(max_size=80), st.text(min_size=1, max_size=15))
def test_always_a_valid_linux_ifname(network: str, container_id: str, ifname: str) -> None:
    name = host_ifname(network, container_id, ifname)
    assert len(name) == 14 <= 15
    assert re.fullmatch(r"tor[0-9a-f]{11}", name)


def test_each_part_of_the_attachment_changes_the_name() -> None:
    base = host_ifname("net", "c1", "eth0")
    assert host_ifname("net2", "c1", "eth0") != base
    assert host_ifname("net", "c2", "eth0") != base
    assert host_ifname("net", "c1", "eth1") != base


def test_resource_uids_are_version_4_uuids_and_distinct() -> None:
    import uuid

    from datastore.store import new_uid

    uids = [new_uid() for _ in range(500)]
    assert len(set(uids)) == len(uids)
    for text in uids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
