"""The in-process path as an entry point of its own: what the compiled front end (``frontend/``)
execs when no agent started the call.

It serves the call in this process with ``dispatch.run`` and must never try the relay again: the
front end already asked the agent, and a second attempt could have the call done twice (the agent
may wake up between the two). It reads stdin as the front end handed it over, unchanged.

    python -I -c "...; from cni_plugins.inprocess import main; sys.exit(main(PLUGIN))"
"""

from __future__ import annotations

import sys


def main(plugin: str) -> int:
    """Serve one call of ``plugin`` (``tortie`` or ``tortie-ipam``) in-process; ends the process
    once the answer is written (``skel.exit_now``)."""
    from cni_plugins.dispatch import ABOUT, run
    from cni_plugins.skel import exit_now

    if plugin not in ABOUT:
        sys.stderr.write(f"cni_plugins.inprocess: unknown plugin {plugin!r}\n")
        return 2
    return exit_now(run(plugin))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else ""))
