"""TCP-MD5 keys read from files: ``BGPPeer.spec.password.file.path`` names a file on the node,
so the key itself is never in etcd. Owns reading those files into the speaker's configuration
(``Peer.password``); must not log a key.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from bgp.model import SpeakerConfig
from datastore.bgp import TCP_MD5_KEY_MAX

log = logging.getLogger(__name__)


class PasswordError(ValueError):
    """A key file cannot be used; the message names the file and the peer, never the key."""


def read_key(path: str, peer: str) -> str:
    try:
        raw = Path(path).read_bytes()
    except OSError as e:
        raise PasswordError(f"peer {peer}: cannot read the TCP-MD5 key file {path}: {e.strerror}") from None
    key = raw.rstrip(b"\r\n")  # a file written by `echo` ends in a newline that is no part of the key
    if not 1 <= len(key) <= TCP_MD5_KEY_MAX:
        raise PasswordError(f"peer {peer}: the TCP-MD5 key in {path} must be 1-{TCP_MD5_KEY_MAX} bytes")
    try:
        return key.decode()
    except UnicodeDecodeError:
        raise PasswordError(f"peer {peer}: the TCP-MD5 key in {path} is not UTF-8 text") from None


def with_keys(config: SpeakerConfig) -> tuple[SpeakerConfig, dict[str, str]]:
    """``config`` with each peer's key read from its file; a peer whose file cannot be used is left
    out (a session without its key would only be refused by the peer), with the reason by address."""
    peers, problems = [], {}
    for peer in config.peers:
        path = peer.options.password_file
        if path is None:
            peers.append(peer)
            continue
        try:
            peers.append(replace(peer, password=read_key(path, peer.address)))
        except PasswordError as e:
            log.error("%s: session not configured", e)
            problems[peer.address] = str(e)
    return replace(config, peers=tuple(peers)), problems
