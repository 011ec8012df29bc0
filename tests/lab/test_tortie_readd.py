"""DEL answers once the kernel has unlisted the pod's veth, while the kernel may still be freeing
it (``kernel.unlisting``): nothing of the attachment is observable by then.

- The runtime's ADD of the very same attachment (container ID, ifname, namespace) right after
  DEL's answer succeeds, with 4 callers doing so at once, round after round; each pod has its
  addresses and answers a ping; after the final DEL no veth is left on the node or in the pods.
- felix-agent SIGKILLed just after its DELs answered, deletions still in the kernel in its
  threads: the kernel finishes them, no veth is left.
- DEL of an attachment whose veth is gone already succeeds.
"""

from __future__ import annotations

import contextlib
import secrets
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from netlab.cni import Attachment, network_config
from tests.lab.tortie_support import Sandbox, TortieLab, host_ifname

pytestmark = pytest.mark.lab

CALLERS = 4
ROUNDS = 12
KILL_PODS = 6
KILL_TRIES = 5


@pytest.fixture(scope="module")
def tl() -> Iterator[TortieLab]:
    with TortieLab.create(prefix="tu") as tl:
        yield tl


def test_add_right_after_del_of_the_same_attachment(tl: TortieLab, path: str) -> None:
    config = network_config(tl.conflist(), 0)
    problems: list[str] = []
    adds = [0] * CALLERS

    def caller(k: int, box: Sandbox) -> None:
        attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {"K8S_POD_NAME": f"readd-{k}"})
        try:
            for n in range(ROUNDS):
                add = tl.call("ADD", config, attachment)
                if not add.ok:
                    problems.append(f"caller {k} round {n}: ADD failed: {add.output or add.stderr}")
                    return
                adds[k] += 1
                inside = box.exec("ip", "-o", "address", "show", "dev", "eth0").stdout
                missing = [ip for ip in add.addresses() if f" {ip} " not in inside]
                if missing:
                    problems.append(f"caller {k} round {n}: {missing} not on eth0: {inside}")
                v4 = next(ip.split("/")[0] for ip in add.addresses() if "." in ip)
                if not tl.lab.ping(tl.node(1).netns, v4):
                    problems.append(f"caller {k} round {n}: {v4} does not answer")
                delete = tl.call("DEL", config, attachment)  # and at once the next round's ADD
                if not delete.ok:
                    problems.append(f"caller {k} round {n}: DEL failed: {delete.output or delete.stderr}")
                    return
        except Exception as e:  # noqa: BLE001 - reported by the test's thread
            problems.append(f"caller {k}: {e!r}")

    with contextlib.ExitStack() as stack:
        boxes = [stack.enter_context(tl.sandbox()) for _ in range(CALLERS)]
        threads = [threading.Thread(target=caller, args=(k, box)) for k, box in enumerate(boxes)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert not problems, "\n".join(problems)
        assert adds == [ROUNDS] * CALLERS
        # Right after the last DELs: no veth on the node nor in any pod.
        assert tl.tor_links() == []
        assert all(box.links() == ["lo"] for box in boxes)
    tl.assert_clean()


def in_dellink(pid: int) -> int:
    """How many of ``pid``'s threads are inside the kernel's deletion of a link right now."""
    count = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            count += "rtnl_dellink" in (task / "stack").read_text()
    return count


def test_agent_killed_with_deletions_in_flight_leaves_no_veth(tl: TortieLab) -> None:
    tl.use_agent(True)
    config = network_config(tl.conflist(), 0)
    caught = 0
    for _ in range(KILL_TRIES):
        with tl.added(KILL_PODS, config) as added:
            answers: list[bool] = []

            def delete(a: Attachment, answers: list[bool] = answers) -> None:
                answers.append(tl.call("DEL", config, a).ok)

            threads = [threading.Thread(target=delete, args=(a,)) for _, a in added]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            pid = tl.agent_pid()
            in_flight = in_dellink(pid)
            tl.agent().kill()
            assert answers == [True] * KILL_PODS
            # SIGKILL ends the agent once its threads leave the kernel; the deletions are finished.
            gone = {host_ifname(a.container_id) for _, a in added}
            assert not gone & set(tl.tor_links())
            assert all(box.links() == ["lo"] for box, _ in added)
            tl.start_agent()
            caught += in_flight > 0
            print(f"agent killed with {in_flight} deletion(s) in its threads")
        if caught:
            break
    assert caught, f"no try of {KILL_TRIES} killed the agent while a deletion was in flight"
    # The same attachments' names are free: a fresh ADD and DEL of one works.
    with tl.sandbox() as box:
        attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {})
        assert tl.call("ADD", config, attachment).ok
        assert tl.call("DEL", config, attachment).ok
    tl.assert_clean()


def test_del_of_a_veth_already_gone_succeeds(tl: TortieLab, path: str) -> None:
    config = network_config(tl.conflist(), 0)
    with tl.sandbox() as box:
        attachment = Attachment(secrets.token_hex(32), box.path, "eth0", {})
        assert tl.call("ADD", config, attachment).ok
        tl.exec(1, "ip", "link", "del", host_ifname(attachment.container_id))
        first = tl.call("DEL", config, attachment)
        assert first.ok, first.output
        again = tl.call("DEL", config, attachment)
        assert again.ok, again.output
    tl.assert_clean()
