"""A `tortie` ADD killed with SIGKILL at a random point leaves nothing that felix-agent's start-up
cleanup and `netctl ipam gc` do not remove.

In-process path (no agent, so the plugin process itself does the work and dies with it). TRIALS kill
times are spread over the measured duration of a whole ADD (one random time in each of TRIALS equal
slices, in random order). Most of an in-process ADD is the interpreter starting, and its run time
varies from call to call (and with the machine's load) by about as much as its working phase lasts,
so the test goes on with kill times aimed at that working phase (first estimated from the moment an
ADD reaches its first write to its end, then moved after each trial that was too early or too late)
until at least MIN_CAUGHT kills have landed after the address reservation. No DEL follows (the
runtime died too). Of the ADDs caught working, every other one also loses its container namespace
(its sandbox was torn down, its veth went with it: an endpoint without a link); the others keep it,
so the host ends of half-made veths are still there for the agent.

A kill that lands after the endpoint was written into a namespace that still exists leaves a
complete attachment (link, endpoint, addresses, all consistent): the agent must keep it, since it
cannot tell it from a running pod. The test checks that such attachments are whole, then DELs them as
the runtime does after a failed ADD; an ADD that finished before its kill is DEL'ed at once.
Everything else must be gone after the agent's start-up cleanup and `ipam gc --grace 0` (the agent
leaves handles younger than its 60 s grace to gc).
"""

from __future__ import annotations

import contextlib
import json
import random
import secrets
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from netlab import netns as ip_netns
from netlab.cni import Attachment, network_config, plugin_env
from netlab.wait import wait_for
from tests.lab.tortie_support import NETWORK, Sandbox, TortieLab, host_ifname

pytestmark = pytest.mark.lab

TRIALS = 20
MIN_CAUGHT = 3  # kills that landed after the address reservation
MAX_TRIALS = 80


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tk") as tl:
        yield tl


@dataclass
class Trial:
    container_id: str
    box: Sandbox
    delay: float
    returncode: int | None = None  # None: killed before it finished
    left: tuple[bool, bool, bool] = (False, False, False)  # (handle, tor link, endpoint) right after the kill
    sandbox_removed: bool = False
    output: str = ""  # what the plugin printed (stdout, then the end of stderr)

    @property
    def caught(self) -> bool:
        """Killed after it had reserved addresses."""
        return self.returncode is None and any(self.left)

    @property
    def attachment(self) -> Attachment:
        return Attachment(self.container_id, self.box.path, "eth0", {"K8S_POD_NAME": f"crash-{self.container_id[:6]}"})


def measure_add(tl: TortieLab, config: dict[str, object]) -> tuple[float, float]:
    """(ready, whole): how soon an ADD reaches its first write (one whose namespace does not exist
    stops right there; the quickest of three) and how long a whole ADD takes (the slowest of
    three), both exec'd as in the trials."""
    ready, whole = [], []
    for _ in range(3):
        missing = Attachment(secrets.token_hex(32), f"/run/netns/{tl.lab.name}-p00000000", "eth0", {})
        stopped = tl.call("ADD", config, missing)
        assert stopped.code == 3, stopped.output
        ready.append(stopped.seconds)
        with tl.sandbox() as box:
            attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {})
            add = tl.call("ADD", config, attachment)
            assert add.ok, add.stdout + add.stderr
            whole.append(add.seconds)
            assert tl.call("DEL", config, attachment).ok
    return min(ready), max(whole)


def run_and_kill(tl: TortieLab, config: bytes, trial: Trial) -> None:
    """Exec the plugin for ADD as a runtime does and SIGKILL it after `trial.delay` seconds,
    unless it finished first. `ip netns exec` execs the plugin, so the PID is the plugin's."""
    env = plugin_env("ADD", trial.attachment, tl.cni_path)
    proc = subprocess.Popen(ip_netns.exec_argv(tl.node(1).netns, [str(tl.bin_dir / "tortie")]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    assert proc.stdin is not None
    proc.stdin.write(config)  # far below a pipe's capacity: never blocks
    proc.stdin.close()
    try:
        proc.wait(timeout=trial.delay)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    assert proc.stdout is not None and proc.stderr is not None
    trial.output = proc.stdout.read().decode(errors="replace") + proc.stderr.read().decode(errors="replace")[-2000:]
    proc.stdout.close()
    proc.stderr.close()
    trial.returncode = None if proc.returncode == -9 else proc.returncode


def describe(trial: Trial) -> str:
    """What one kill left, e.g. "HL- at 312 ms": Handle, tor Link, Endpoint."""
    left = "".join(letter if present else "-" for letter, present in zip("HLE", trial.left, strict=True))
    return f"{left}{' (netns removed)' if trial.sandbox_removed else ''} at {trial.delay * 1000:.0f} ms"


def test_sigkilled_adds_leave_nothing_after_agent_cleanup_and_gc(tl: TortieLab) -> None:
    assert not tl.agent_running()
    config = network_config(tl.conflist(), 0)
    stdin = json.dumps(config).encode()
    ready, whole_add = measure_add(tl, config)
    seed = secrets.randbits(32)
    rng = random.Random(seed)
    delays = [(k + rng.random()) * whole_add / TRIALS for k in range(TRIALS)]
    rng.shuffle(delays)
    trials: list[Trial] = []

    with contextlib.ExitStack() as boxes:
        def trial(delay: float) -> None:
            t = Trial(secrets.token_hex(32), boxes.enter_context(tl.sandbox()), delay)
            trials.append(t)
            run_and_kill(tl, stdin, t)
            assert t.returncode in (None, 0), f"ADD failed on its own (exit {t.returncode}): {t.output}"
            if t.returncode == 0:  # finished before its kill: an ordinary pod, which the runtime DELs
                assert tl.call("DEL", config, t.attachment).ok
                return
            host_if = host_ifname(t.container_id)
            state = tl.datastore()
            t.left = (f"{NETWORK}.{t.container_id}.eth0" in state.handles, host_if in tl.tor_links(),
                      f"default/n1-{host_if}" in state.endpoints)
            if t.caught and sum(x.caught for x in trials) % 2 == 0:
                ip_netns.delete(t.box.name)
                t.sandbox_removed = True

        for delay in delays:
            trial(delay)
        # Then aim at the working phase, following it as the machine's load moves it: a kill that
        # found nothing done aims later next time, an ADD that finished first aims earlier.
        aim, step = (ready + whole_add) / 2, max(0.005, (whole_add - ready) / 4)
        while sum(t.caught for t in trials) < MIN_CAUGHT and len(trials) < MAX_TRIALS:
            trial(max(0.0, rng.uniform(aim - step, aim + step)))
            last = trials[-1]
            if last.returncode == 0:
                aim -= step / 2
            elif not last.caught:
                aim += step / 2

        killed = [t for t in trials if t.returncode is None]
        caught = [t for t in trials if t.caught]
        print(f"\nin-process ADD: first write after {ready * 1000:.0f} ms, whole {whole_add * 1000:.0f} ms "
              f"(seed {seed}); {len(trials)} trials, {len(killed)} killed, {len(caught)} after the reservation: "
              + ", ".join(map(describe, caught)))
        assert len(caught) >= MIN_CAUGHT, f"only {len(caught)} of {len(trials)} kills landed while the ADD worked"
        # The kernel destroys a namespace (and the veths in it) asynchronously; the node has settled
        # long before an agent restarts.
        removed = {host_ifname(t.container_id) for t in trials if t.sandbox_removed}
        wait_for(lambda: not removed & set(tl.tor_links()), 10, "the removed namespaces' veths to go")

        tl.start_agent()  # its start-up cleanup runs before its socket appears
        gc = tl.netctl(1, "ipam", "gc", "--grace", "0")
        print(tl.agent_output().strip().splitlines()[-2:], gc.stdout.strip().splitlines()[-1:])

        # What is left must be whole attachments only (killed after the endpoint was written), in
        # namespaces that still exist.
        state = tl.datastore()
        whole = [t for t in killed if f"default/n1-{host_ifname(t.container_id)}" in state.endpoints]
        assert not any(t.sandbox_removed for t in whole), "an endpoint whose veth is gone survived the cleanup"
        assert tl.tor_links() == sorted(host_ifname(t.container_id) for t in whole)
        assert state.endpoints == sorted(f"default/n1-{host_ifname(t.container_id)}" for t in whole)
        assert state.handles == sorted(f"{NETWORK}.{t.container_id}.eth0" for t in whole)
        assert sorted(state.allocations.values()) == sorted(
            f"{NETWORK}.{t.container_id}.eth0" for t in whole for _ in "46")
        for t in whole:
            check = tl.call("CHECK", config, t.attachment)
            assert check.ok, f"a kept attachment is not whole: {check.output}"
            assert tl.call("DEL", config, t.attachment).ok
        print(f"{len(whole)} killed ADD(s) had completed their work and were kept, then DEL'ed")

    tl.stop_agent()
    tl.assert_clean()
