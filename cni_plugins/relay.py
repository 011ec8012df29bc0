"""The fast path of both plugin executables: hand the whole call to felix-agent and print its answer.

A runtime execs the plugin for every ADD and DEL, so what this module imports is paid on every
call. It imports only modules written in C (``_json``, ``_socket``) besides ``os`` and ``sys``:
the ``json`` and ``socket`` packages would cost ~15 ms of CPU (``re`` compiles json's patterns,
``enum`` builds socket's constants). It does not interpret the call: it reads the configuration
only to find the agent's socket, forwards the ``CNI_*`` and ``ETCD_*`` environment and stdin as
they came, and the agent runs the same skeleton and the same operations as the in-process path on
them, so both paths give the same answer to the same call.

The exchange, one call per connection (``agent_protocol`` is the agent's side):
  request  ``<plugin>\\n<environment as a JSON object>\\n<stdin bytes>``, then the write side is shut;
  reply    ``<exit status>\\n<stdout bytes>``.
"""

import _json
import _socket
import posix  # built in; ``os`` is not loaded yet under -S and would cost ~1.5 ms of CPU
import sys

DEFAULT_SOCKET = "/run/tortie/cni.sock"
TIMEOUT = 60.0  # long enough for an ADD on a loaded node; the agent answers well within it
FORWARDED = ("CNI_", "ETCD_")
_WHITESPACE = " \t\n\r"
_FALLBACK_VERSION = "1.1.0"


class _Context:
    """What the C scanner reads from json.JSONDecoder; the defaults of ``json.loads``."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    memo: dict[str, str] = {}

    @staticmethod
    def parse_constant(name: str) -> float:
        return {"-Infinity": float("-inf"), "Infinity": float("inf"), "NaN": float("nan")}[name]




def loads(text: str) -> object:
    """``json.loads`` for a document without the ``json`` package; ValueError when it is not one."""
    scan = _json.make_scanner(_Context())  # type: ignore[arg-type]
    start = len(text) - len(text.lstrip(_WHITESPACE))
    try:
        value, end = scan(text, start)
    except Exception:  # noqa: BLE001 - StopIteration, or SystemError: see below
        # The C scanner builds its error from json.decoder when that is loaded, and otherwise
        # fails with SystemError: either way not a document (the in-process path says why).
        raise ValueError("not a JSON document") from None
    if text[end:].strip(_WHITESPACE):
        raise ValueError("extra data after the JSON document")
    return value


def _string(value: str) -> str:
    return str(_json.encode_basestring_ascii(value))


def socket_path(config: object) -> str | None:
    """The agent socket a configuration names (``agent_socket``, top level or in ``ipam``), the
    default when it names none, and None when the value is not usable (the in-process path then
    reports the configuration error)."""
    if not isinstance(config, dict):
        return None
    path = config.get("agent_socket")
    if path is None and isinstance(config.get("ipam"), dict):
        path = config["ipam"].get("agent_socket")
    if path is None:
        return DEFAULT_SOCKET
    return path if isinstance(path, str) and path.startswith("/") else None


def _error(config: object, code: int, msg: str, details: str) -> bytes:
    version = config.get("cniVersion") if isinstance(config, dict) else None
    if version not in ("0.4.0", "1.0.0", "1.1.0"):
        version = _FALLBACK_VERSION
    return (f'{{"cniVersion": {_string(str(version))}, "code": {code}, "msg": {_string(msg)}, '
            f'"details": {_string(details)}}}\n').encode()


def _environ() -> dict[str, str]:
    return {k.decode("utf-8", "surrogateescape"): v.decode("utf-8", "surrogateescape")
            for k, v in posix.environ.items()}


def relay(plugin: str, data: bytes, environ: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    """Have the node's agent serve this call: ``(exit status, stdout bytes)``; None when there is
    no agent to ask (no socket, nobody listening, not allowed) or the call is not one to forward."""
    env = _environ() if environ is None else environ
    if not env.get("CNI_COMMAND"):
        return None  # run by a human: the plugin describes itself
    try:
        config = loads(data.decode())
    except ValueError:  # UnicodeDecodeError too: the in-process path reports the decode error
        return None
    path = socket_path(config)
    if path is None:
        return None
    forwarded = ",".join(f"{_string(k)}:{_string(v)}" for k, v in env.items() if k.startswith(FORWARDED))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    try:
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError):
            return None
        sock.sendall(f"{plugin}\n{{{forwarded}}}\n".encode() + data)
        sock.shutdown(_socket.SHUT_WR)
        chunks = []
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    except TimeoutError:
        return 1, _error(config, 11, "the node agent did not answer in time", path)
    except OSError as e:
        return 1, _error(config, 11, "lost the connection to the node agent", f"{path}: {e}")
    finally:
        sock.close()
    status, newline, output = b"".join(chunks).partition(b"\n")
    if not newline or not status.isdigit():
        return 1, _error(config, 11, "the node agent closed the connection without an answer", path)
    return int(status), output


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
