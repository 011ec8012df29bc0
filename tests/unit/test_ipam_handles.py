"""Handle names (ipam.handles): one handle per attachment (network, container ID, interface), and
which attachment a legacy ``<network>.<containerID>`` handle belongs to."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from ipam.handles import attachment_handle, attachment_of, belongs_to, legacy_handle

names = st.text(st.characters(blacklist_characters=".", blacklist_categories=("Cs",)), min_size=1, max_size=20)


def test_the_names() -> None:
    assert attachment_handle("tortie-net", "abc", "eth0") == "tortie-net.abc.eth0"
    assert legacy_handle("tortie-net", "abc") == "tortie-net.abc"


@given(names, names, names, names)
def test_two_interfaces_of_one_container_never_share_a_handle(network: str, container: str, a: str, b: str) -> None:
    assert (attachment_handle(network, container, a) == attachment_handle(network, container, b)) == (a == b)


def test_a_legacy_handle_belongs_to_the_interface_its_attributes_record() -> None:
    attrs = {"network": "net", "containerID": "abc", "ifname": "net1"}
    assert belongs_to(attrs, "net", "abc", "net1")
    assert not belongs_to(attrs, "net", "abc", "eth0")
    assert not belongs_to(attrs, "other", "abc", "net1")
    assert belongs_to({}, "net", "abc", "eth0")  # written before attributes were recorded: eth0
    assert not belongs_to({}, "net", "abc", "net1")


def test_the_attachment_attributes_record() -> None:
    assert attachment_of({"network": "n", "containerID": "c", "ifname": "i", "x": "y"}) == ("n", "c", "i")
    assert attachment_of({}) == ("", "", "")
