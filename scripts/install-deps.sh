#!/usr/bin/env bash
# Installs what Tortie needs on a Debian 12 machine: system packages and the project's venv.
# Idempotent: a second run installs nothing new. Usage: scripts/install-deps.sh [--no-apt]
set -euo pipefail
here=$(cd "$(dirname "$0")/.." && pwd)
venv=${TORTIE_VENV:-$here/.venv}

apt_packages=(
  etcd-server etcd-client          # the datastore and etcdctl (raw-etcd benchmark reference)
  iproute2 nftables procps iputils-ping util-linux   # ip, nft, sysctl, ping, nsenter
  containernetworking-plugins      # the reference CNI plugins (bridge, ptp, host-local, portmap, ...)
  python3-venv python3-dev
  golang-go golang-github-appc-cni-dev     # the libcni client the tests build (GOPATH mode)
  podman runc conmon uidmap busybox-static # podman 4.3 with its CNI backend, a busybox image
  qemu-system-x86 linux-image-amd64        # the VM that runs the IPIP tests (no ipip module here)
  bird2                                    # a BGP peer we did not write (external peer, reflector)
  frr                                      # FRR 8.4's bgpd: a second external BGP peer (filters, communities)
  iperf3                                   # pod-to-pod throughput in bench/dataplane_bench.py
)

need_apt=()
if [ "${1:-}" != "--no-apt" ]; then
  for p in "${apt_packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_apt+=("$p")
  done
  if [ ${#need_apt[@]} -gt 0 ]; then
    echo "install-deps: apt-get install ${need_apt[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  fi
  # Debian starts an etcd on the default ports; Tortie's tests and labs run their own.
  if command -v systemctl >/dev/null && systemctl is-active --quiet etcd 2>/dev/null; then
    systemctl stop etcd || true; systemctl disable etcd >/dev/null 2>&1 || true
  fi
  # Debian's frr service would run zebra in the root namespace; the lab runs its own bgpd per namespace.
  if command -v systemctl >/dev/null && systemctl is-enabled --quiet frr 2>/dev/null; then
    systemctl stop frr || true; systemctl disable frr >/dev/null 2>&1 || true
  fi
fi

# Debian's interpreter, not a pyenv shim: the CNI executables start with the venv's python.
if [ ! -x "$venv/bin/python" ]; then
  /usr/bin/python3 -m venv "$venv"
fi
# compat mode: a plain path entry, not an import hook that every CNI exec would pay for.
"$venv/bin/pip" install -q --disable-pip-version-check -e "$here[dev]" --config-settings editable_mode=compat
# The CNI executables are not pip console scripts (those import re and site on every call): the
# same fast front ends `netctl install-cni` puts in a runtime's CNI directory. The first run builds
# the compiled front end (frontend/, Go) into $venv/libexec/tortie; without Go it keeps the Python
# relay. Either way one line says which.
front=$("$venv/bin/netctl" install-cni --plugins-only --bin-dir "$venv/bin" | grep '^tortie:')
echo "install-deps: $front"
# Every agent, ExaBGP, netctl call and in-process plugin is a new interpreter, and an environment
# with PYTHONDONTWRITEBYTECODE=1 (this one's) never caches what it compiles: without this, each of
# them compiles the modules it imports again (netctl --help: ~375 ms instead of ~205).
"$venv/bin/python" -m compileall -q -j 0 "$here"/{kernel,cni_plugins,datastore,ipam,netctl,pki,bgp,felix_agent,netlab,bench} >/dev/null
echo "install-deps: ready ($venv)"
