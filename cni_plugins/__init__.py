"""Tortie's CNI plugins.

Owns the CNI skeleton (environment and stdin parsing, version negotiation, result and error JSON,
exit codes: ``skel``, ``result``, ``errors``), the ``tortie`` main plugin and the ``tortie-ipam``
plugin, and the veth/route wiring of one container.

Must not keep state outside the datastore. The skeleton modules are imported on every CNI call, so
they import only the standard library; heavier imports happen lazily inside the plugins.
"""
