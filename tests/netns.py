"""Fake hosts on one machine: network namespaces joined by veth links, with their own names and addresses.

Each fake host is a network namespace with one NIC named ``eth0`` (Open MPI and DeepSpeed's openmpi runner
default to ``btl_tcp_if_include eth0``), its own ``/etc/hosts`` (``/etc/netns/<ns>/hosts``, bind-mounted by
``ip netns exec``) that maps every host name to its ``eth0`` address, and its own hostname (a UTS namespace per
command, so DeepSpeed's MPI discovery sees distinct hosts). Two hosts are joined by one veth pair; three or more
by a bridge in an extra namespace, so the root namespace is never touched. A link's bandwidth can be limited
with ``tc tbf`` on every ``eth0`` (this kernel has no ``netem``: bandwidth only, no added delay).

Usage (root, or CAP_SYS_ADMIN + CAP_NET_ADMIN)::

    from tests.netns import FakeHosts

    with FakeHosts(2) as cluster:                       # node0 = 10.231.0.1, node1 = 10.231.0.2
        cluster.shape(200)                              # 200 Mbit/s each way
        print(cluster.measure_mbit(0, 1))               # ~190
        proc = cluster.hosts[1].popen(["python3", "train.py"])
        cluster.hosts[0].run(["python3", "train.py"], timeout=120)
        cluster.unshape()

``hosts[i].cmd(argv)`` is ``argv`` prefixed with ``ip netns exec <ns> unshare --uts ...`` (it sets the hostname);
``cluster.rsh_env()`` plus the ssh-compatible agent ``tests/nsrsh.sh`` lets ``mpirun`` (``--mca plm_rsh_agent``)
or pdsh reach the other hosts by name or address. Namespaces are named ``<prefix><owner pid>-<seq>-h<i>``:
entering the context first removes leftovers whose owner process is dead (a run killed before its teardown), and
leaves those of live owners (another test session or a benchmark running beside) alone. Where namespaces cannot be
created, ``FakeHosts.up`` raises ``NetnsUnavailable`` with the reason (tests skip with it).

Command line: ``python3 -m tests.netns hold 2 --mbit 200`` creates two hosts, prints each one's command prefix
and the rsh environment, and tears them down on Ctrl-C or SIGTERM; ``python3 -m tests.netns cleanup`` removes
every leftover of a dead owner.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any

__all__ = ["FakeHost", "FakeHosts", "NetnsUnavailable", "NSRSH", "cleanup_stale", "list_namespaces", "main",
           "netns_pids"]

NSRSH = Path(__file__).resolve().with_name("nsrsh.sh")
"""ssh-compatible agent that runs a command on a fake host (see ``FakeHosts.rsh_env``)."""

DEFAULT_PREFIX = "acco"
_SEQ = count()
_NETNS_ETC = Path("/etc/netns")
_CMD_TIMEOUT_S = 30.0


class NetnsUnavailable(RuntimeError):
    """Network namespaces cannot be created here (no root / CAP_SYS_ADMIN / CAP_NET_ADMIN, or no ``ip``)."""


@dataclass(frozen=True)
class FakeHost:
    """One fake host: namespace ``ns``, hostname ``name``, address ``addr`` on its ``eth0``."""

    index: int
    ns: str
    name: str
    addr: str

    def prefix(self) -> list[str]:
        """The command prefix that runs a program on this host (its network namespace and hostname)."""
        return ["ip", "netns", "exec", self.ns, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"',
                self.name]

    def cmd(self, argv: Sequence[str]) -> list[str]:
        """``argv`` to run on this host."""
        return self.prefix() + list(argv)

    def run(self, argv: Sequence[str], timeout: float = 60.0, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on this host and wait (text output captured unless ``stdout``/``stderr`` are given)."""
        kwargs.setdefault("capture_output", "stdout" not in kwargs and "stderr" not in kwargs)
        return subprocess.run(self.cmd(argv), timeout=timeout, text=True, **kwargs)

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[str]:
        """Start ``argv`` on this host in a new session (so that its process group can be killed) and return."""
        kwargs.setdefault("start_new_session", True)
        return subprocess.Popen(self.cmd(argv), text=True, **kwargs)

    def pids(self) -> list[int]:
        """Processes running in this host's network namespace."""
        return netns_pids(self.ns)


class FakeHosts:
    """N fake hosts ``node0..node{N-1}`` with addresses ``<subnet>.1..N``; a context manager (``up``/``down``).

    Args:
        num_hosts: how many hosts (at least 1). Two are joined by a veth pair, more by a bridge.
        subnet: the first three octets of the /24 the hosts live in. Namespaces have their own address space,
            so several ``FakeHosts`` may use the same subnet at the same time.
        prefix: first part of the namespace names; ``cleanup_stale(prefix)`` finds leftovers by it.
        name_format: hostname of host i (``str.format`` with ``i``).
        clean_stale: remove leftovers of dead owners before creating anything.
    """

    def __init__(self, num_hosts: int = 2, subnet: str = "10.231.0", prefix: str = DEFAULT_PREFIX,
                 name_format: str = "node{i}", clean_stale: bool = True) -> None:
        if not 1 <= num_hosts <= 250:
            raise ValueError(f"num_hosts must be in 1..250, got {num_hosts}")
        if not re.fullmatch(r"[a-z][a-z0-9]*", prefix):
            raise ValueError(f"prefix must be lower-case letters and digits, got {prefix!r}")
        self.prefix = prefix
        self.clean_stale = clean_stale
        base = f"{prefix}{os.getpid()}-{next(_SEQ)}"
        self.hosts: list[FakeHost] = [FakeHost(i, f"{base}-h{i}", name_format.format(i=i), f"{subnet}.{i + 1}")
                                      for i in range(num_hosts)]
        self.bridge_ns: str | None = f"{base}-br" if num_hosts > 2 else None
        self._created: list[str] = []
        self.shaped_mbit: float | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def __enter__(self) -> FakeHosts:
        return self.up()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.down()

    @property
    def namespaces(self) -> list[str]:
        """Every namespace this object owns (hosts, then the bridge if any)."""
        return [h.ns for h in self.hosts] + ([self.bridge_ns] if self.bridge_ns else [])

    def up(self) -> FakeHosts:
        """Create the namespaces, links, addresses and ``/etc/hosts`` files; return self.

        Raises:
            NetnsUnavailable: namespaces cannot be created here (the message says why); nothing is left behind.
            subprocess.CalledProcessError: a later setup command failed; what was created is removed.
        """
        if self.clean_stale:
            cleanup_stale(self.prefix)
        if shutil.which("ip") is None or shutil.which("unshare") is None:
            raise NetnsUnavailable("`ip` (iproute2) or `unshare` (util-linux) is not installed")
        try:
            self._add_namespace(self.hosts[0].ns, probe=True)
            for ns in self.namespaces[1:]:
                self._add_namespace(ns)
            self._link()
            hosts_file = "127.0.0.1 localhost\n::1 localhost ip6-localhost ip6-loopback\n" + "".join(
                f"{h.addr} {h.name}\n" for h in self.hosts)
            for h in self.hosts:
                _ip("-n", h.ns, "addr", "add", f"{h.addr}/24", "dev", "eth0")
                _ip("-n", h.ns, "link", "set", "eth0", "up")
                (_NETNS_ETC / h.ns).mkdir(parents=True, exist_ok=True)
                (_NETNS_ETC / h.ns / "hosts").write_text(hosts_file)
            probe = subprocess.run(self.hosts[0].cmd(["hostname"]), capture_output=True, text=True,
                                   timeout=_CMD_TIMEOUT_S)
            if probe.returncode != 0 or probe.stdout.strip() != self.hosts[0].name:
                raise NetnsUnavailable(f"cannot enter the namespace with its own hostname (`ip netns exec ... "
                                       f"unshare --uts`): rc={probe.returncode} {probe.stderr.strip()}")
        except BaseException:
            self.down()
            raise
        return self

    def down(self) -> None:
        """Kill every process left on the hosts, delete the namespaces and their ``/etc/netns`` entries."""
        for ns in self.namespaces:
            _remove_namespace(ns)
        self._created.clear()
        self.shaped_mbit = None

    def _add_namespace(self, ns: str, probe: bool = False) -> None:
        res = subprocess.run(["ip", "netns", "add", ns], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
        if res.returncode != 0:
            msg = res.stderr.strip() or f"rc={res.returncode}"
            if probe:
                raise NetnsUnavailable(f"cannot create a network namespace (`ip netns add` needs root or "
                                       f"CAP_SYS_ADMIN + CAP_NET_ADMIN): {msg}")
            raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
        self._created.append(ns)
        _ip("-n", ns, "link", "set", "lo", "up")

    def _link(self) -> None:
        if len(self.hosts) == 2:
            a, b = self.hosts
            _ip("link", "add", "eth0", "netns", a.ns, "type", "veth", "peer", "name", "eth0", "netns", b.ns)
        elif self.bridge_ns is not None:
            _ip("-n", self.bridge_ns, "link", "add", "br0", "type", "bridge")
            _ip("-n", self.bridge_ns, "link", "set", "br0", "up")
            for h in self.hosts:
                port = f"p{h.index}"
                _ip("link", "add", "eth0", "netns", h.ns, "type", "veth", "peer", "name", port, "netns",
                    self.bridge_ns)
                _ip("-n", self.bridge_ns, "link", "set", port, "master", "br0")
                _ip("-n", self.bridge_ns, "link", "set", port, "up")
        else:  # a single host: eth0 is one end of a veth pair whose other end stays down in the same namespace
            h = self.hosts[0]
            _ip("-n", h.ns, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0peer")

    # -- using the hosts -------------------------------------------------------------------------------------

    def hostfile(self, path: str | os.PathLike[str], slots: int = 1) -> Path:
        """Write a DeepSpeed / Open MPI hostfile (``node0 slots=1`` ...) and return its path."""
        out = Path(path)
        out.write_text("".join(f"{h.name} slots={slots}\n" for h in self.hosts))
        return out

    def rsh_env(self) -> dict[str, str]:
        """Environment for ``tests/nsrsh.sh``: ``ACCO_NETNS_HOSTS`` maps names and addresses to namespaces."""
        entries = [f"{key}={h.ns}:{h.name}" for h in self.hosts for key in (h.name, h.addr)]
        return {"ACCO_NETNS_HOSTS": " ".join(entries)}

    def kill_processes(self) -> list[int]:
        """SIGKILL every process left on the hosts (after a failed or timed-out launch); return their pids."""
        killed: list[int] = []
        for ns in self.namespaces:
            killed += _killnetns_pids(ns)
        return killed

    def shape(self, mbit: float, hosts: Sequence[int] | None = None, latency_ms: int = 50) -> None:
        """Limit each given host's ``eth0`` egress to ``mbit`` Mbit/s (``tc tbf``; all hosts by default).

        Shaping every end gives a full-duplex link of ``mbit`` each way. The burst is one kernel tick's worth
        of bytes at that rate (at least 64 KiB), so high rates are reachable. Replaces an earlier shaping.
        """
        if mbit <= 0:
            raise ValueError(f"mbit must be positive, got {mbit}")
        burst = max(65536, int(mbit * 1e6 / 8 / 250))
        for i in range(len(self.hosts)) if hosts is None else hosts:
            _ip_tc(self.hosts[i].ns, "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate", f"{mbit}mbit",
                   "burst", str(burst), "latency", f"{latency_ms}ms")
        self.shaped_mbit = mbit

    def unshape(self) -> None:
        """Remove any shaping (back to the veth's native speed)."""
        for h in self.hosts:
            subprocess.run(["ip", "netns", "exec", h.ns, "tc", "qdisc", "del", "dev", "eth0", "root"],
                           capture_output=True, timeout=_CMD_TIMEOUT_S)
        self.shaped_mbit = None

    def qdisc(self, host: int = 0) -> str:
        """``tc qdisc show dev eth0`` on a host (to check the shaping)."""
        return _ip_tc(self.hosts[host].ns, "qdisc", "show", "dev", "eth0")

    def measure_mbit(self, src: int = 0, dst: int = 1, nbytes: int = 2_000_000, port: int = 5299,
                     timeout_s: float = 60.0) -> float:
        """Send ``nbytes`` over TCP from host ``src`` to host ``dst``; return the goodput in Mbit/s.

        Timed at the receiver from the end of the first chunk to the end of the stream, so the initial
        burst of the shaper is not counted (Python's socket, no iperf3).
        """
        dst_host = self.hosts[dst]
        receiver = (
            "import socket, sys, time\n"
            f"s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
            f"s.bind(({dst_host.addr!r}, {port})); s.listen(1); print('ready', flush=True)\n"
            "c, _ = s.accept(); c.recv(1 << 20); t0 = time.perf_counter(); n = 0\n"
            "while True:\n"
            "    b = c.recv(1 << 20)\n"
            "    if not b: break\n"
            "    n += len(b)\n"
            "print(n, time.perf_counter() - t0, flush=True)\n")
        sender = (
            "import socket\n"
            f"s = socket.create_connection(({dst_host.addr!r}, {port}), timeout={timeout_s})\n"
            f"s.sendall(b'x' * {nbytes}); s.close()\n")
        recv = self.hosts[dst].popen([sys.executable, "-c", receiver], stdout=subprocess.PIPE)
        try:
            assert recv.stdout is not None
            if recv.stdout.readline().strip() != "ready":
                raise RuntimeError("throughput receiver did not start")
            self.hosts[src].run([sys.executable, "-c", sender], timeout=timeout_s, check=True)
            out, _ = recv.communicate(timeout=timeout_s)
        finally:
            if recv.poll() is None:
                recv.kill()
                recv.wait()
        received, seconds = out.split()  # bytes after the first chunk, and the time they took
        return int(received) * 8 / max(float(seconds), 1e-9) / 1e6


def list_namespaces() -> list[str]:
    """Names of all network namespaces (``ip netns list``)."""
    res = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    return [line.split()[0] for line in res.stdout.splitlines() if line.strip()]


def cleanup_stale(prefix: str = DEFAULT_PREFIX) -> list[str]:
    """Remove namespaces (and ``/etc/netns`` entries) named by ``FakeHosts(prefix=...)`` whose owner is dead.

    The owner is the process id in the name; a live owner's namespaces are kept, so concurrent sessions are safe.
    Returns the names removed.
    """
    if shutil.which("ip") is None:
        return []
    pattern = re.compile(rf"{re.escape(prefix)}(\d+)-\d+-(?:h\d+|br)")
    names = set(list_namespaces())
    if _NETNS_ETC.is_dir():
        names |= {p.name for p in _NETNS_ETC.iterdir()}
    removed = []
    for name in sorted(names):
        m = pattern.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            _remove_namespace(name)
            removed.append(name)
    return removed


# -- helpers ---------------------------------------------------------------------------------------------------

def _ip(*args: str) -> str:
    res = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
    return res.stdout


def _ip_tc(ns: str, *args: str) -> str:
    res = subprocess.run(["ip", "netns", "exec", ns, "tc", *args], capture_output=True, text=True,
                         timeout=_CMD_TIMEOUT_S)
    if res.returncode != 0:
        raise subprocess.CalledProcessError(res.returncode, res.args, res.stdout, res.stderr)
    return res.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def netns_pids(ns: str) -> list[int]:
    """Pids of the processes in network namespace ``ns`` (``ip netns pids``)."""
    res = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=_CMD_TIMEOUT_S)
    return [int(p) for p in res.stdout.split() if p.isdigit()]


def _killnetns_pids(ns: str) -> list[int]:
    """SIGKILL the processes in ``ns`` until none is left (or 10 s pass); return those killed."""
    killed: list[int] = []
    deadline = time.monotonic() + 10.0
    while time.monotonic() < deadline:
        pids = [p for p in netns_pids(ns) if p != os.getpid()]
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.05)
    return killed


def _remove_namespace(ns: str) -> None:
    if ns in list_namespaces():
        _killnetns_pids(ns)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=_CMD_TIMEOUT_S)
    shutil.rmtree(_NETNS_ETC / ns, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python3 -m tests.netns cleanup`` | ``python3 -m tests.netns hold [N] [--mbit R]`` (see the module doc)."""
    import argparse
    import shlex

    parser = argparse.ArgumentParser(prog="python3 -m tests.netns", description="fake hosts in network namespaces")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("cleanup", help="remove leftovers of dead owners")
    hold = sub.add_parser("hold", help="create N hosts, print how to use them, tear down on Ctrl-C / SIGTERM")
    hold.add_argument("num_hosts", type=int, nargs="?", default=2)
    hold.add_argument("--mbit", type=float, default=None, help="limit every eth0 to this many Mbit/s")
    hold.add_argument("--subnet", default="10.231.0")
    args = parser.parse_args(argv)
    if args.command == "cleanup":
        print("removed:", " ".join(cleanup_stale()) or "nothing")
        return 0
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    with FakeHosts(args.num_hosts, subnet=args.subnet) as cluster:
        if args.mbit:
            cluster.shape(args.mbit)
        for h in cluster.hosts:
            print(f"{h.name} {h.addr}: {shlex.join(h.prefix())} <command>")
        print(f"export {shlex.join(f'{k}={v}' for k, v in cluster.rsh_env().items())}  # for {NSRSH}")
        print("Ctrl-C (or SIGTERM) tears them down.", flush=True)
        try:
            signal.pause()
        except KeyboardInterrupt:
            pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
