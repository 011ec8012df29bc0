"""etcd clients for CNI work: opened per call in-process, kept open (warm) by the agent."""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Mapping

from datastore.config import EtcdConfig
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
        self._clients: dict[EtcdConfig, EtcdClient] = {}
        self._lock = threading.Lock()

    def for_environment(self, environment: Mapping[str, str]) -> Datastores:
        """The same (warm) connections, with settings missing from a configuration taken from
        ``environment``: the agent serves each relayed call with the caller's environment."""
        view = Datastores(keep_open=self.keep_open, environment=environment, mtu_file=self.mtu_file)
        view._clients, view._lock = self._clients, self._lock
        return view

    @contextlib.contextmanager
    def client(self, config: EtcdConfig) -> Iterator[EtcdClient]:
        if not self.keep_open:
            with EtcdClient(config) as client:
                yield client
            return
        with self._lock:
            if config not in self._clients:
                self._clients[config] = EtcdClient(config)
            warm = self._clients[config]
        yield warm

    def close(self) -> None:
        with self._lock:
            for client in self._clients.values():
                client.close()
            self._clients.clear()


ONE_SHOT = Datastores(keep_open=False)
