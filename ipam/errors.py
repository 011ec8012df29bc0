"""IPAM's exceptions. Each is mapped to a CNI error code in one place (``cni_plugins``) and to a
one-line message by ``netctl``."""

from __future__ import annotations


class IPAMError(Exception):
    """Base class of IPAM failures a user can act on."""


class PoolExhausted(IPAMError):
    """No free address in any usable pool (or this node may claim no more blocks)."""


class NoSuitablePool(IPAMError):
    """No enabled pool matches the request (unknown pool name, wrong family, node selector)."""


class AddressInUse(IPAMError):
    """A specific address was requested but another attachment holds it."""


class AddressReserved(IPAMError):
    """A specific address was requested that an IPReservation covers."""


class AddressNotInPool(IPAMError):
    """A specific address was requested that lies outside every pool."""


class TooManyConflicts(IPAMError):
    """Compare-and-swap kept losing: the datastore is too busy; try again later."""
