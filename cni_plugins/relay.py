"""The fast path of both plugin executables: hand the whole call to felix-agent and return its answer.

A runtime execs the plugin for every ADD and DEL, so what this module imports is paid on every
call. It imports only modules written in C (``_json``, ``_socket``) besides ``os`` and ``sys``:
the ``json`` and ``socket`` packages would cost ~15 ms of CPU (``re`` compiles json's patterns,
``enum`` builds socket's constants). It does not interpret the call: it reads the configuration
only to find the agent's socket, forwards the ``CNI_*`` and ``ETCD_*`` environment and stdin as
they came, and the agent runs the same skeleton and the same operations as the in-process path on
them, so both paths give the same answer to the same call.

The exchange, one call per connection (``agent_protocol`` is the agent's side; the compiled front
end in ``frontend/`` speaks the same):
  request  ``<plugin> <accept-by> <answer-by>\n<environment as a JSON object>\n<stdin bytes>``, then
           the write side is shut. The deadlines are Unix time in milliseconds.
  reply    ``+\n`` when, and only when, the agent starts the work (it does only before accept-by),
           then ``<exit status> <byte count>\n<stdout bytes>``.
A front end that sees no ``+`` by accept-by shuts the connection down in both directions, which
makes the agent's later writes fail, so the agent never starts: then, and only then, the call is
served in-process. After a ``+`` it waits until answer-by and then answers code 11; the agent,
whose answer can no longer be written, undoes an ADD it made. So a frozen agent costs a call at most
ACCEPT_TIMEOUT, a hung one at most ANSWER_TIMEOUT, and no call is ever done twice or done after
its caller was told it failed.
"""

import _json
import _socket
import posix  # built in; ``os`` is not loaded yet under -S and would cost ~1.5 ms of CPU
import time  # built in

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

DEFAULT_SOCKET = "/run/tortie/cni.sock"
# Seconds (environment: TORTIE_RELAY_ACCEPT_TIMEOUT, TORTIE_RELAY_ANSWER_TIMEOUT). A warm agent
# accepts within a millisecond; an answer includes the policy wait (felix-agent --policy-timeout, 10 s).
ACCEPT_TIMEOUT = 2.0
ANSWER_TIMEOUT = 25.0
MAX_REPLY = 16 << 20
ACCEPTED = b"+\n"
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


def _seconds(env: dict[str, str], name: str, default: float) -> float:
    try:
        value = float(env.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class _Fallback(Exception):
    """The agent did not take the call and never will: serve it in-process."""


def relay(plugin: str, data: bytes, environ: dict[str, str] | None = None) -> tuple[int, bytes] | None:
    """Have the node's agent serve this call: ``(exit status, stdout bytes)``; None when there is
    no agent to ask (no socket, nobody listening, not allowed), when it did not take the call in
    time, or when the call is not one to forward: the caller then serves it in-process."""
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
    now = time.time()
    accept_by = now + _seconds(env, "TORTIE_RELAY_ACCEPT_TIMEOUT", ACCEPT_TIMEOUT)
    answer_by = now + _seconds(env, "TORTIE_RELAY_ANSWER_TIMEOUT", ANSWER_TIMEOUT)
    forwarded = ",".join(f"{_string(k)}:{_string(v)}" for k, v in env.items() if k.startswith(FORWARDED))
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.settimeout(max(accept_by - time.time(), 0.001))
        try:
            sock.connect(path)
        except (FileNotFoundError, ConnectionRefusedError, PermissionError, BlockingIOError):
            return None  # BlockingIOError: a full backlog, so the request was never queued
        header = f"{plugin} {int(accept_by * 1000)} {int(answer_by * 1000)}\n{{{forwarded}}}\n"
        sock.sendall(header.encode() + data)
        sock.shutdown(_socket.SHUT_WR)
        got = _read_until(sock, b"", accept_by, lambda d: len(d) >= len(ACCEPTED))
        if not got.startswith(ACCEPTED):
            if got or time.time() < accept_by:  # it refused the call (closed), or spoke nonsense
                return 1, _error(config, 11, "the node agent closed the connection without an answer", path)
            raise _Fallback
        got = _read_until(sock, got, answer_by, lambda d: _complete(d) is not None)
    except _Fallback:
        return None
    except OSError as e:
        return 1, _error(config, 11, "lost the connection to the node agent", f"{path}: {e}")
    finally:
        sock.close()
    answer = _complete(got)
    if answer is None:
        if len(got) > MAX_REPLY:
            return 1, _error(config, 11, "the node agent's answer is too large", path)
        return 1, _error(config, 11, "the node agent did not answer in time", path)
    return answer


def _read_until(sock: _socket.socket, got: bytes, deadline: float, enough: "Callable[[bytes], bool]") -> bytes:
    """Read until ``enough(bytes so far)``, end of stream, or ``deadline``. At the deadline the
    connection is shut down both ways first (the agent's writes fail from then on, atomically), and
    what had already arrived is all there is."""
    chunks = [got]
    data = got
    while not enough(data):
        left = deadline - time.time()
        if left <= 0:
            sock.shutdown(_socket.SHUT_RDWR)
            sock.setblocking(False)
            while True:
                try:
                    chunk = sock.recv(65536)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks)
        sock.settimeout(left)
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        if not chunk:
            break
        chunks.append(chunk)
        data = b"".join(chunks)
        if len(data) > MAX_REPLY + 64:
            break
    return b"".join(chunks)


def _complete(data: bytes) -> tuple[int, bytes] | None:
    """(status, stdout) of a whole reply after the ``+`` line; None while it is not whole."""
    line, newline, output = data[len(ACCEPTED):].partition(b"\n")
    status, space, count = line.partition(b" ")
    if not newline or not space or not status.isdigit() or not count.isdigit():
        return None
    if len(output) != int(count) or int(count) > MAX_REPLY:
        return None
    return int(status), output
