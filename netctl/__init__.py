"""netctl: the operator CLI (calicoctl's role).

Owns parsing command lines, reading resource files, printing tables and documents, and mapping
every failure to an exit status and a one-line message (``netctl.main``). Commands: resources
(``apply``, ``create``, ``replace``, ``delete``, ``get``), ``ipam``, ``pki``, ``version``.

Must not hold business logic that belongs to the packages below it: validation is
``datastore``'s, address management and its consistency checks ``ipam``'s.
"""
