"""The compiled CNI front end (``frontend/``, Go): where its build lives, whether it is current,
and building it. ``netctl install-cni`` copies it into a CNI bin dir; it does not decide what a
plugin call does (the front end and ``cni_plugins`` own that).

The build happens at install time, never at run time: ``scripts/install-deps.sh`` runs
``netctl install-cni --plugins-only --bin-dir .venv/bin``, which builds ``frontend/`` once into
``<venv>/libexec/tortie/tortie``; later installs copy that binary and rebuild it only when its
stamp no longer matches (the sources, the interpreter or the package root changed) and ``go`` is
there. The interpreter and the package root of the in-process fallback are written into the
binary (``-ldflags -X``), so a copy in /opt/cni/bin needs nothing beside it. Nothing downloads:
the module has no dependencies and the build runs with ``GOPROXY=off``.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

BUILD_TIMEOUT = 600.0
GO_SEARCH_PATH = "/usr/lib/go/bin:/usr/local/go/bin"


@dataclass(frozen=True)
class Build:
    """A usable compiled front end (``binary``), or why there is none (``reason``)."""

    binary: Path | None
    reason: str = ""


def package_root() -> Path:
    """The directory that holds the ``cni_plugins`` package (the checkout, or site-packages)."""
    import cni_plugins

    return Path(cni_plugins.__file__).resolve().parent.parent


def source_dir() -> Path | None:
    """``frontend/`` beside the packages: a checkout or an editable install has it, a wheel not."""
    src = package_root() / "frontend"
    return src if (src / "go.mod").is_file() else None


def built_binary() -> Path:
    """Where this installation keeps its build (inside the venv, or the prefix)."""
    return Path(sys.prefix) / "libexec" / "tortie" / "tortie"


def interpreter() -> str:
    """The interpreter the fallback execs: this one, by the venv's own name for it when that is
    the same file (``python`` and ``python3`` of one venv must not make two different builds)."""
    canonical = Path(sys.prefix) / "bin" / "python3"
    try:
        if canonical.exists() and os.path.samefile(canonical, sys.executable):
            return str(canonical)
    except OSError:
        pass
    return sys.executable


def go_tool() -> str | None:
    return shutil.which("go") or shutil.which("go", path=GO_SEARCH_PATH)


def stamp(src: Path | None) -> str:
    """What a build depends on: the sources, the interpreter and the package root it execs."""
    digest = hashlib.sha256()
    if src is not None:
        for path in sorted([*src.glob("*.go"), src / "go.mod"]):
            if not path.name.endswith("_test.go"):
                digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return f"sources {digest.hexdigest()}\npython {interpreter()}\nroot {package_root()}\n"


def ensure_built() -> Build:
    """The current build, made now if it is missing or stale and a Go toolchain exists."""
    src, binary = source_dir(), built_binary()
    stamp_file = binary.with_name("tortie.stamp")
    have = stamp_file.read_text() if binary.is_file() and stamp_file.is_file() else None
    if src is None:
        if have is not None and have.split("\n", 1)[1] == stamp(None).split("\n", 1)[1]:
            return Build(binary)  # installed without sources: the build shipped with the prefix
        return Build(None, f"no frontend/ sources beside {package_root()} and no build in {binary.parent}")
    want = stamp(src)
    if have == want:
        return Build(binary)
    go = go_tool()
    if go is None:
        return Build(None, "no Go toolchain: apt-get install golang-go")
    try:
        return build(go, src, binary, want)
    except OSError as e:
        return Build(None, f"cannot build into {binary.parent}: {e.strerror}")


def build(go: str, src: Path, binary: Path, stamp_text: str) -> Build:
    """``go build`` the front end for this interpreter into ``binary`` (atomically)."""
    values = {"main.python": interpreter(), "main.packageRoot": str(package_root())}
    if any("'" in v or "\n" in v for v in values.values()):
        return Build(None, f"a path with a quote cannot be built in: {values}")
    ldflags = " ".join(["-s", "-w", *(f"-X '{k}={v}'" for k, v in values.items())])
    binary.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=binary.parent, prefix=".tortie.")
    os.close(fd)
    env = {**os.environ, "CGO_ENABLED": "0", "GOPROXY": "off", "GOFLAGS": "-mod=mod", "GO111MODULE": "on"}
    with tempfile.TemporaryDirectory(prefix="tortie-go-") as scratch:
        # Without HOME (CI, systemd) go has no cache or GOPATH of its own: give it a throwaway one.
        if not any(env.get(k) for k in ("GOCACHE", "XDG_CACHE_HOME", "HOME")):
            env["GOCACHE"] = str(Path(scratch) / "cache")
        if not env.get("GOPATH") and not env.get("HOME"):
            env["GOPATH"] = str(Path(scratch) / "gopath")
        try:
            argv = [go, "build", "-trimpath", "-buildvcs=false", "-ldflags", ldflags, "-o", tmp, "."]
            done = subprocess.run(argv, cwd=src, env=env, capture_output=True, text=True, timeout=BUILD_TIMEOUT)
        except (OSError, subprocess.TimeoutExpired) as e:
            Path(tmp).unlink(missing_ok=True)
            return Build(None, f"go build failed: {e}")
    if done.returncode != 0:
        Path(tmp).unlink(missing_ok=True)
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return Build(None, f"go build failed: {lines[-1]}")
    os.chmod(tmp, 0o755)
    os.replace(tmp, binary)
    binary.with_name("tortie.stamp").write_text(stamp_text)
    return Build(binary)
