"""``nft`` without a process: the same commands run through libnftables (the library nft is built on).

Each ``nft -f`` costs a fork and exec plus a fresh read of the kernel's table (the cache nft
builds before it parses): ~3 ms for a small table, ~16 ms at 5,000 endpoint chains. The library
keeps one context for the agent's life and refreshes its cache only when the kernel's generation
moved, so the same transaction costs ~0.1 ms and ~8 ms. Commands, output and error text are
nft's own, so the driver cannot tell the two apart (``runner()`` returns a ``Runner``).
"""

from __future__ import annotations

import ctypes
import logging
import subprocess
import threading
import weakref
from collections.abc import Sequence

log = logging.getLogger(__name__)

NFT_CTX_DEFAULT = 0
NFT_CTX_OUTPUT_JSON = 1 << 4  # nft -j


class LibNft:
    """One libnftables context; calls are serialised (a context is not thread-safe)."""

    def __init__(self, library: str = "libnftables.so.1") -> None:
        lib = ctypes.CDLL(library, use_errno=True)
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        ctx = lib.nft_ctx_new(NFT_CTX_DEFAULT)
        if not ctx:
            raise OSError("libnftables could not create a context")
        if lib.nft_ctx_buffer_output(ctx) or lib.nft_ctx_buffer_error(ctx):
            lib.nft_ctx_free(ctx)
            raise OSError("libnftables could not buffer its output")
        self._lib, self._ctx = lib, ctx
        self._base_flags = lib.nft_ctx_output_get_flags(ctx)
        self._lock = threading.Lock()
        self._free = weakref.finalize(self, lib.nft_ctx_free, ctx)  # the context's socket and cache

    def run(self, args: Sequence[str], stdin: str | None) -> subprocess.CompletedProcess[str]:
        """What ``nft <args>`` (with ``stdin`` for ``-f -``) would have returned; the flags the
        driver uses are ``-j`` (JSON output) and ``-f -`` (a script on stdin)."""
        words = list(args)
        json_output = "-j" in words
        words = [w for w in words if w != "-j"]
        if words[:2] == ["-f", "-"]:
            command = stdin or ""
        elif words and not words[0].startswith("-"):
            command = " ".join(words)
        else:
            return subprocess.CompletedProcess(["nft", *args], 64, "", f"libnft: unsupported arguments {words}")
        with self._lock:
            if not self._free.alive:
                return subprocess.CompletedProcess(["nft", *args], 70, "", "libnft: the context is closed")
            flags = self._base_flags | (NFT_CTX_OUTPUT_JSON if json_output else 0)
            self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, command.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        return subprocess.CompletedProcess(["nft", *args], 0 if rc == 0 else 1, out, err)

    def close(self) -> None:
        with self._lock:
            self._free()


def runner() -> LibNft | None:
    """A library-backed runner for this process's network namespace, or None when libnftables
    cannot be loaded (then the driver execs ``nft``)."""
    try:
        return LibNft()
    except OSError as err:
        log.info("libnftables unavailable (%s): running the nft command", err)
        return None
