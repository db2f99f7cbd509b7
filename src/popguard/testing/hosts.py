"""Several hosts on one machine, for tests: Linux network namespaces on a bridge.

Each host is a network namespace of its own with one veth link to a bridge that the
harness makes, an address from the benchmarking range 198.18.0.0/15 (RFC 2544), and
its own loopback. A process started `on` a host sees only that host's network, as a
process of a real machine would; the file system is shared, so each host is given a
data folder of its own by the caller. Everything is deleted at the end, processes
in the namespaces first. Needs root (CI and these sessions run tests as root).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import time
from dataclasses import dataclass, field
from typing import Self

BENCHMARK_NET = "198.18"  # 198.18.0.0/15: for tests of networks, never routed


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, timeout=30)


@dataclass
class Host:
    name: str
    namespace: str
    address: str

    def command(self, *argv: str) -> list[str]:
        """`argv` as run on this host."""
        return ["ip", "netns", "exec", self.namespace, *argv]


@dataclass
class HostNetwork:
    """Hosts on one bridge; `with HostNetwork.make(["pg", "cas1", ...]) as net:`."""

    tag: str
    subnet: str  # "198.18.N"
    bridge: str
    hosts: dict[str, Host] = field(default_factory=dict)

    @classmethod
    def make(cls, names: list[str]) -> Self:
        tag = secrets.token_hex(3)
        # 198.18.0.0/15 has 512 /24s; a random one keeps runs side by side apart.
        third = secrets.randbelow(256)
        second = 18 + secrets.randbelow(2)
        network = cls(tag, f"198.{second}.{third}", f"pgbr{tag}")
        try:
            _ip("link", "add", network.bridge, "type", "bridge")
            _ip("link", "set", network.bridge, "up")
            for number, name in enumerate(names, start=1):
                network._add(name, number)
        except BaseException:
            network.remove()
            raise
        return network

    def _add(self, name: str, number: int) -> None:
        namespace = f"popguard-{self.tag}-{name}"
        outside, inside = f"pgv{self.tag}{number}", f"pgh{self.tag}{number}"
        _ip("netns", "add", namespace)
        host = Host(name, namespace, f"{self.subnet}.{number}")
        self.hosts[name] = host
        _ip("link", "add", outside, "type", "veth", "peer", "name", inside)
        _ip("link", "set", outside, "master", self.bridge)
        _ip("link", "set", outside, "up")
        _ip("link", "set", inside, "netns", namespace)
        _ip("-n", namespace, "link", "set", "lo", "up")
        _ip("-n", namespace, "link", "set", inside, "name", "eth0")
        _ip("-n", namespace, "addr", "add", f"{host.address}/24", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")

    def __getitem__(self, name: str) -> Host:
        return self.hosts[name]

    def cut(self, name: str) -> None:
        """Take a host off the network (its link down): the loss of a host, or of the
        link to it, as the others see it; its processes go on."""
        _ip("-n", self.hosts[name].namespace, "link", "set", "eth0", "down")

    def mend(self, name: str) -> None:
        _ip("-n", self.hosts[name].namespace, "link", "set", "eth0", "up")

    def remove(self) -> None:
        for host in self.hosts.values():
            _kill_namespace(host.namespace)
            with contextlib.suppress(subprocess.CalledProcessError):
                _ip("netns", "del", host.namespace)
        with contextlib.suppress(subprocess.CalledProcessError):
            _ip("link", "del", self.bridge)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def _kill_namespace(namespace: str) -> None:
    """SIGTERM, then SIGKILL, every process still running in the namespace."""
    for sig, wait in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        pids = _pids(namespace)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + wait
        while _pids(namespace) and time.monotonic() < deadline:
            time.sleep(0.1)


def _pids(namespace: str) -> list[int]:
    done = subprocess.run(
        ["ip", "netns", "pids", namespace], capture_output=True, text=True, timeout=30
    )
    return [int(pid) for pid in done.stdout.split()]
