"""The entry point of both plugin executables: relay the call to felix-agent, or serve it in-process.

Owns the choice between the two paths and ending the process once the answer is written. Sits above
both: ``relay`` (the fast path, C modules only) and ``dispatch`` (the in-process path, which pays the
imports only when no agent took the call), so neither imports the other's caller. Must import no
more than ``relay`` does before it knows that the call falls back: it runs on every CNI exec.
"""

import posix  # built in; ``os`` is not loaded yet under -S
import sys

from cni_plugins.relay import relay


def main(plugin: str) -> int:
    """The executable's entry point: relay, or run the plugin in-process when no agent answers.
    Ends the process once the answer is written (see ``skel.exit_now``)."""
    try:
        data: bytes | None = sys.stdin.buffer.read()
    except OSError:
        data = None  # the in-process skeleton reports it
    answer = relay(plugin, data) if data is not None else None
    if answer is not None:
        status, output = answer
        while output:
            output = output[posix.write(1, output):]
        if b"TORTIE_NO_EXIT_NOW" not in posix.environ:
            posix._exit(status)
        return status
    import io

    if sys.flags.no_site:  # started with -S: the in-process path needs the installed packages
        import site

        site.main()
    from cni_plugins.dispatch import run
    from cni_plugins.skel import exit_now

    return exit_now(run(plugin, None if data is None else io.BytesIO(data)))
