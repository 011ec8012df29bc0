"""etcd clients for CNI work: opened per call in-process, kept open (warm) by the agent; a call the
agent serves gets a view of them that also carries the agent's hooks (``cni_plugins.agent_call``)."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping

from datastore.config import EtcdConfig
from datastore.kv import KV

# typing costs milliseconds at import and is only needed by the type checker (mypy reads this idiom).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from cni_plugins.agent_call import AgentCall
    from datastore.etcd import EtcdClient


class Datastores:
    """``environment`` is where settings missing from a CNI configuration come from: the plugin
    process's own environment; never the agent's (the front end writes the runtime's into the
    request), so that both paths give the same answer to the same request."""

    def __init__(self, *, keep_open: bool, environment: Mapping[str, str] | None = None,
                 mtu_file: str = "/run/tortie/mtu") -> None:
        self.keep_open = keep_open
        self.environment: Mapping[str, str] = os.environ if environment is None else environment
        # Where the node's agent writes the MTU of the encapsulation in use (its --state-dir).
        self.mtu_file = mtu_file
        # The agent's hooks for the call this view serves; None in a plugin process.
        self.call: AgentCall | None = None
        self._clients: dict[EtcdConfig, KV] = {}
        self._lock = threading.Lock()
        self._one_shot = threading.local()

    def for_environment(self, environment: Mapping[str, str], call: AgentCall | None = None) -> Datastores:
        """The same (warm) connections, with settings missing from a configuration taken from
        ``environment``: the agent serves each relayed call with the caller's environment, and
        its ``call`` hooks."""
        view = Datastores(keep_open=self.keep_open, environment=environment, mtu_file=self.mtu_file)
        view.call = call
        view._clients, view._lock = self._clients, self._lock
        return view

    @contextlib.contextmanager
    def client(self, config: EtcdConfig) -> Iterator[KV]:
        if not self.keep_open:
            # One call in a plugin process: etcd's JSON gateway, which needs no gRPC import, one
            # connection per thread for the call's steps (the process ends after the call).
            cache = self._one_shot.__dict__.setdefault("clients", {})
            if config not in cache:
                from datastore.gateway import GatewayClient

                cache[config] = GatewayClient(config)
            yield cache[config]
            return
        with self._lock:
            if config not in self._clients:
                from datastore.etcd import EtcdClient

                self._clients[config] = EtcdClient(config)
            warm = self._clients[config]
        yield warm

    @contextlib.contextmanager
    def etcd(self, config: EtcdConfig) -> Iterator[EtcdClient]:
        """The warm gRPC client itself (watches, leases): the agent's own work."""
        with self.client(config) as client:
            from datastore.etcd import EtcdClient

            assert isinstance(client, EtcdClient), "only a keep-open Datastores has a gRPC client"
            yield client

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


ONE_SHOT = Datastores(keep_open=False)
