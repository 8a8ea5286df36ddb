"""Real multi-host launches of ACCO on fake hosts (network namespaces), through every launch path, and plain MPI.

Two fake hosts (``tests/netns.py``: namespaces ``node0``/``node1`` joined by a veth pair, ``eth0`` each, own
``/etc/hosts`` and hostname), one rank each, train ``tests/mn_train.py`` for a few ACCO steps through:

1. ``deepspeed --hostfile H --no_ssh --node_rank K --master_addr node0`` started on each host;
2. ``deepspeed --hostfile H --launcher openmpi`` on node0, Open MPI reaching node1 through ``tests/nsrsh.sh``;
3. ``mpirun -np 2`` across the hosts, ranks from ``deepspeed.init_distributed(auto_mpi_discovery=True)``;
4. ``mpirun -np 2`` on this machine (plain MPI, no namespaces).

Each asserts that both ranks printed their success line on the expected host, that their parameters are
identical, bitwise equal to the in-process single-host 2-rank run (``dist_utils.run_distributed``) and within
1e-5 of the independent reference. Also checks the fake hosts themselves: names, addresses, the ``tc`` shaping,
the removal of leftovers of a killed run. Needs root (or CAP_SYS_ADMIN + CAP_NET_ADMIN) for ``multinode`` and
Open MPI + mpi4py for ``mpi``; otherwise skipped with the reason, unless ``ACCO_REQUIRE_MULTINODE=1`` (set by
``.ci/run`` as root), which turns the skip into a failure. Run alone:
``python3 -m pytest -q -m "multinode or mpi" tests -rA``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest
import torch

from deepspeed_acco.plan import int8_estimate_fraction
from deepspeed_acco.schedule import SWITCH_WITHIN, TRIAL_STEPS, TRIALS
from tests.acco_reference import reference_train
from tests.dist_utils import free_port, run_distributed
from tests.netns import NSRSH, FakeHosts, NetnsUnavailable, cleanup_stale, list_namespaces, netns_pids
from tests.workers import (
    DEEPSPEED_DEFAULT_CLIP,
    DEFAULT_ESTIMATE_HALF,
    DEFAULT_ESTIMATE_SHIFT,
    HIDDEN,
    base_config,
    loss_fn,
    make_batches,
    make_model,
    replay_schedules,
    train_worker,
)

WORLD, GA, STEPS, LR, SEED = 2, 4, 3, 1e-2, 0
TOL = 1e-5
LAUNCH_TIMEOUT_S = 150
REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "mn_train.py"
REQUIRED = os.environ.get("ACCO_REQUIRE_MULTINODE") == "1"


def _unavailable(reason: str) -> NoReturn:
    """Skip with the reason, or fail where the environment promises these tests can run (CI as root)."""
    if REQUIRED:
        pytest.fail(f"ACCO_REQUIRE_MULTINODE=1 but: {reason}")
    pytest.skip(reason)


def _deepspeed_cli() -> list[str]:
    """The ``deepspeed`` launcher next to this interpreter (not a pyenv shim), else the one on PATH."""
    local = Path(sys.executable).with_name("deepspeed")
    found = str(local) if local.exists() else shutil.which("deepspeed")
    return [found] if found else [sys.executable, "-m", "deepspeed.launcher.runner"]


def _launch_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of every launch: CPU accelerator, one thread, unbuffered, mpirun allowed as root."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1",
           "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1", **(extra or {})}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # a launcher sets these; stale values would bypass MPI discovery
    return env


def _finish(proc: subprocess.Popen[str], deadline: float) -> tuple[int, str]:
    """Wait for ``proc`` until ``deadline``; on timeout SIGTERM then SIGKILL its process group. (rc, output)."""
    try:
        out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        return proc.returncode, out
    except subprocess.TimeoutExpired:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                out, _ = proc.communicate(timeout=5)
                break
            except subprocess.TimeoutExpired:
                out = ""
        return 124, f"{out}\n*** killed after the {LAUNCH_TIMEOUT_S} s launch timeout ***"


def _launch(cmds: list[list[str]], env: dict[str, str]) -> tuple[list[int], str, float]:
    """Start the commands together (one per launching host), wait for all; (return codes, output, wall seconds)."""
    t0 = time.monotonic()
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              start_new_session=True) for cmd in cmds]
    deadline = t0 + LAUNCH_TIMEOUT_S
    results = [_finish(p, deadline) for p in reversed(procs)][::-1]
    wall = time.monotonic() - t0
    output = "\n".join(f"===== launch {i}: {' '.join(c[-12:])}\n{out}" for i, (c, (_, out)) in
                       enumerate(zip(cmds, results)))
    return [rc for rc, _ in results], output, wall


def _check_run(name: str, rcs: list[int], output: str, wall: float, out_tmpl: str, hosts: list[str],
               single_host: list[torch.Tensor], reference: list[torch.Tensor]) -> None:
    """Asserts (c) per-rank success lines on the expected hosts, (a) identical ranks, (b) = single-host run."""
    print(f"LAUNCH {name}: {wall:.1f} s wall, return codes {rcs}")
    tail = output[-6000:]
    assert all(rc == 0 for rc in rcs), f"{name}: return codes {rcs}\n{tail}"
    for rank, host in enumerate(hosts):
        line = re.search(rf"^.*\[rank {rank}/{WORLD}\] host=(\S+) .*steps={STEPS} .* done$", output, re.M)
        assert line, f"{name}: no success line from rank {rank}\n{tail}"
        assert line.group(1) == host, f"{name}: rank {rank} ran on {line.group(1)}, expected {host}"
    saved = [torch.load(out_tmpl.format(rank=r)) for r in range(WORLD)]
    assert [s["hostname"] for s in saved] == hosts
    assert all(s["global_steps"] == STEPS and s["world_size"] == WORLD for s in saved)
    params0, params1 = saved[0]["params"], saved[1]["params"]
    assert all(torch.equal(a, b) for a, b in zip(params0, params1)), f"{name}: ranks' parameters differ"
    diff_single = max(float((a - b).abs().max()) for a, b in zip(params0, single_host))
    diff_ref = max(float((a - b).abs().max()) for a, b in zip(params0, reference))
    print(f"PARITY {name}: max |diff| vs single-host run {diff_single:.3e}, vs reference {diff_ref:.3e}")
    assert all(torch.equal(a, b) for a, b in zip(params0, single_host)), \
        f"{name}: not bitwise equal to the single-host run (max |diff| {diff_single:.3e})"
    assert diff_ref < TOL


# -- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cluster() -> Iterator[FakeHosts]:
    """Two fake hosts node0/node1 (leftovers of a killed run removed first); torn down after the module."""
    try:
        hosts = FakeHosts(2).up()
    except NetnsUnavailable as exc:
        _unavailable(str(exc))
    try:
        yield hosts
    finally:
        hosts.down()


@pytest.fixture
def hosts(cluster: FakeHosts) -> Iterator[FakeHosts]:
    """The module's fake hosts, unshaped, with no process left on them after the test."""
    cluster.unshape()
    yield cluster
    deadline = time.monotonic() + 5.0  # a finished launch's last processes may still be exiting
    while time.monotonic() < deadline and any(h.pids() for h in cluster.hosts):
        time.sleep(0.1)
    killed = cluster.kill_processes()
    cluster.unshape()
    assert not killed, f"processes left on the fake hosts after the test: {killed}"


@pytest.fixture(scope="module")
def mpi() -> None:
    """Open MPI's ``mpirun`` and mpi4py are installed."""
    if shutil.which("mpirun") is None or shutil.which("ompi_info") is None:
        _unavailable("Open MPI is not installed (apt-get install openmpi-bin libopenmpi-dev)")
    if importlib.util.find_spec("mpi4py") is None:
        _unavailable("mpi4py is not installed (pip install -e '.[mpi]')")


@pytest.fixture(scope="module")
def single_host() -> list[torch.Tensor]:
    """Parameters of the same training as 2 ranks on this host, through the in-process harness."""
    cfg = base_config(GA, LR, acco={"enabled": True})
    results = run_distributed(train_worker, WORLD, cfg, STEPS, SEED, timeout_s=120)
    assert all(torch.equal(a, b) for a, b in zip(results[0]["params"], results[1]["params"]))
    return results[0]["params"]


@pytest.fixture(scope="module")
def reference() -> list[torch.Tensor]:
    """The independent single-process reference of that training."""
    batches = make_batches(SEED, WORLD, STEPS * GA * 6 + 8)
    out = reference_train(make_model(SEED), batches, loss_fn, mode="acco", num_steps=STEPS,
                          gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                          max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                          estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA])
    return list(out.values())


# -- the fake hosts ----------------------------------------------------------------------------------------------

@pytest.mark.multinode
@pytest.mark.timeout(60)
def test_fake_hosts_have_own_names_and_addresses(hosts: FakeHosts) -> None:
    """Each host has its hostname, its eth0 address, resolves the others by name, and reaches them (ping, rsh)."""
    for h in hosts.hosts:
        res = h.run(["sh", "-c", "hostname; hostname -I; getent hosts $(hostname); ip -brief addr show eth0"])
        assert res.returncode == 0, res.stderr
        name, addrs, own, eth0 = res.stdout.splitlines()
        assert (name, addrs.split(), own.split()) == (h.name, [h.addr], [h.addr, h.name])
        assert eth0.startswith("eth0") and "UP" in eth0
    peer = hosts.hosts[1]
    ping = hosts.hosts[0].run(["ping", "-c", "1", "-W", "5", peer.name])
    assert ping.returncode == 0 and f"({peer.addr})" in ping.stdout, ping.stdout + ping.stderr
    rsh = subprocess.run([str(NSRSH), "-x", "-o", "BatchMode=yes", f"root@{peer.addr}", "hostname;", "hostname -I"],
                         env={**os.environ, **hosts.rsh_env()}, capture_output=True, text=True, timeout=30)
    assert rsh.stdout.split() == [peer.name, peer.addr], rsh.stderr


@pytest.mark.multinode
@pytest.mark.timeout(60)
def test_shape_limits_bandwidth(hosts: FakeHosts) -> None:
    """tc tbf at 50 Mbit/s holds both directions to about 50 Mbit/s; unshape gives the native speed back."""
    hosts.shape(50)
    assert "tbf" in hosts.qdisc(0) and "rate 50Mbit" in hosts.qdisc(1)
    shaped = [hosts.measure_mbit(0, 1, nbytes=1_500_000), hosts.measure_mbit(1, 0, nbytes=1_500_000)]
    hosts.unshape()
    free = hosts.measure_mbit(0, 1, nbytes=20_000_000)
    print(f"SHAPE 50 Mbit/s: measured {shaped[0]:.1f} / {shaped[1]:.1f} Mbit/s; unshaped {free:.0f} Mbit/s")
    assert all(35 < s < 55 for s in shaped), shaped
    assert free > 4 * 50
    assert "tbf" not in hosts.qdisc(0)


@pytest.mark.multinode
@pytest.mark.timeout(60)
def test_leftovers_of_a_dead_owner_are_removed(hosts: FakeHosts) -> None:
    """cleanup_stale removes namespaces (and /etc/netns entries) of a dead owner, keeps those of live ones."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = f"{hosts.prefix}{dead.pid}-0-h0"
    subprocess.run(["ip", "netns", "add", stale], check=True, timeout=30)
    Path("/etc/netns", stale).mkdir(parents=True, exist_ok=True)
    Path("/etc/netns", stale, "hosts").write_text("127.0.0.1 localhost\n")
    sleeper = subprocess.Popen(["ip", "netns", "exec", stale, "sleep", "600"])
    try:
        deadline = time.monotonic() + 30.0  # wait until the sleeper is inside the namespace (a loaded machine is slow)
        while sleeper.pid not in netns_pids(stale) and sleeper.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sleeper.pid in netns_pids(stale), "the sleeper never entered the stale namespace"
        removed = cleanup_stale(hosts.prefix)
        assert stale in removed
        assert stale not in list_namespaces() and not Path("/etc/netns", stale).exists()
        assert sleeper.wait(timeout=10) == -signal.SIGKILL  # a process left in it is killed too
        assert all(h.ns in list_namespaces() for h in hosts.hosts)  # ours (live owner) are kept
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
        subprocess.run(["ip", "netns", "del", stale], capture_output=True, timeout=30)


# -- launch paths ------------------------------------------------------------------------------------------------

@pytest.mark.multinode
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_deepspeed_no_ssh_on_each_host(hosts: FakeHosts, tmp_path: Path, single_host: list[torch.Tensor],
                                       reference: list[torch.Tensor]) -> None:
    """``deepspeed --hostfile H --no_ssh --node_rank K --master_addr node0`` started on each host."""
    hostfile = hosts.hostfile(tmp_path / "hostfile")
    out = str(tmp_path / "params_{rank}.pt")
    cmds = [h.cmd([*_deepspeed_cli(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(h.index),
                   "--master_addr", hosts.hosts[0].name, "--master_port", "29511", str(SCRIPT), "--out", out,
                   "--steps", str(STEPS), "--ga", str(GA)]) for h in hosts.hosts]
    rcs, output, wall = _launch(cmds, _launch_env())
    _check_run("deepspeed --no_ssh", rcs, output, wall, out, ["node0", "node1"], single_host, reference)


@pytest.mark.multinode
@pytest.mark.mpi
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_deepspeed_openmpi_launcher(hosts: FakeHosts, mpi: None, tmp_path: Path, single_host: list[torch.Tensor],
                                    reference: list[torch.Tensor]) -> None:
    """``deepspeed --hostfile H --launcher openmpi`` on node0; mpirun reaches node1 through the rsh agent."""
    hostfile = hosts.hostfile(tmp_path / "hostfile")
    out = str(tmp_path / "params_{rank}.pt")
    cmd = hosts.hosts[0].cmd([*_deepspeed_cli(), "--hostfile", str(hostfile), "--launcher", "openmpi",
                              "--no_ssh_check", "--master_addr", hosts.hosts[0].name,
                              f"--launcher_args=--mca plm_rsh_agent {NSRSH}", str(SCRIPT), "--out", out,
                              "--steps", str(STEPS), "--ga", str(GA), "--port", "29512"])
    rcs, output, wall = _launch([cmd], _launch_env(hosts.rsh_env()))
    _check_run("deepspeed --launcher openmpi", rcs, output, wall, out, ["node0", "node1"], single_host, reference)


@pytest.mark.multinode
@pytest.mark.mpi
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_mpirun_across_hosts(hosts: FakeHosts, mpi: None, tmp_path: Path, single_host: list[torch.Tensor],
                             reference: list[torch.Tensor]) -> None:
    """``mpirun -np 2`` from node0 to node0+node1; the script discovers ranks through MPI."""
    out = str(tmp_path / "params_{rank}.pt")
    cmd = hosts.hosts[0].cmd(["mpirun", "-np", str(WORLD), "--host", ",".join(f"{h.name}:1" for h in hosts.hosts),
                              "--mca", "plm_rsh_agent", str(NSRSH), "--mca", "btl_tcp_if_include", "eth0",
                              "--mca", "oob_tcp_if_include", "eth0", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
                              "-x", "PYTHONUNBUFFERED", sys.executable, "-u", str(SCRIPT), "--out", out,
                              "--steps", str(STEPS), "--ga", str(GA), "--port", "29513"])
    rcs, output, wall = _launch([cmd], _launch_env(hosts.rsh_env()))
    _check_run("mpirun across hosts", rcs, output, wall, out, ["node0", "node1"], single_host, reference)


@pytest.mark.mpi
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_mpirun_single_host(mpi: None, tmp_path: Path, single_host: list[torch.Tensor],
                            reference: list[torch.Tensor]) -> None:
    """Plain MPI: ``mpirun -np 2`` on this machine, ranks from MPI discovery, no namespaces."""
    out = str(tmp_path / "params_{rank}.pt")
    cmd = ["mpirun", "-np", str(WORLD), "--oversubscribe", "-x", "DS_ACCELERATOR", "-x", "OMP_NUM_THREADS",
           "-x", "PYTHONUNBUFFERED", sys.executable, "-u", str(SCRIPT), "--out", out, "--steps", str(STEPS),
           "--ga", str(GA), "--port", str(free_port())]
    rcs, output, wall = _launch([cmd], _launch_env())
    host = os.uname().nodename
    _check_run("mpirun single host", rcs, output, wall, out, [host, host], single_host, reference)


# -- the node-aware compressed round: 2 hosts x 2 ranks ------------------------------------------------------------

WIDE = 1 << 17
"""The MLP's width for the byte count: about 1.7M parameters, so that a round's bytes dwarf the protocol's own."""
PER_NODE = 2
BYTES_TOL = 0.10


def _launch_two_by_two(hosts: FakeHosts, tmp_path: Path, name: str, port: int, extra: list[str],
                       hidden: int = WIDE) -> list[dict]:
    """``deepspeed --hostfile (2 slots each) --no_ssh`` on both hosts: 4 ranks, 2 per host; their saved results."""
    hostfile = hosts.hostfile(tmp_path / f"hostfile_{name}", slots=PER_NODE)
    out = str(tmp_path / f"{name}_{{rank}}.pt")
    cmds = [h.cmd([*_deepspeed_cli(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(h.index),
                   "--master_addr", hosts.hosts[0].name, "--master_port", str(port), str(SCRIPT), "--out", out,
                   "--steps", str(STEPS), "--ga", str(GA), "--hidden", str(hidden), "--iface", "eth0", *extra])
            for h in hosts.hosts]
    rcs, output, wall = _launch(cmds, _launch_env())
    print(f"LAUNCH 2x2 {name}: {wall:.1f} s wall, return codes {rcs}")
    assert all(rc == 0 for rc in rcs), f"{name}: return codes {rcs}\n{output[-6000:]}"
    world = len(hosts.hosts) * PER_NODE
    saved = [torch.load(out.format(rank=r)) for r in range(world)]
    assert [s["hostname"] for s in saved] == [h.name for h in hosts.hosts for _ in range(PER_NODE)]
    assert all(s["global_steps"] == STEPS and s["world_size"] == world for s in saved)
    assert all(all(torch.equal(a, b) for a, b in zip(saved[0]["params"], s["params"])) for s in saved[1:])
    return saved


@pytest.mark.multinode
@pytest.mark.timeout(5 * LAUNCH_TIMEOUT_S)
def test_node_aware_round_on_two_hosts_of_two_ranks(hosts: FakeHosts, tmp_path: Path) -> None:
    """2 fake hosts x 2 ranks (the DeepSpeed launcher's LOCAL_SIZE=2): the int8 estimate round runs node-aware,
    its parameters are within 1e-6 of the reference (node sums quantized; the test's small MLP, where no value
    sits on a rounding edge), and what it adds to each host's link on a 1.7M-parameter MLP (int8 run minus half a
    plain ACCO run, counted on the veth) is the planner's formula within 10 %."""
    small = _launch_two_by_two(hosts, tmp_path, "int8_small", 29520, ["--compression", "int8", "--block", "16"],
                               hidden=HIDDEN)
    runs = {name: _launch_two_by_two(hosts, tmp_path, name, 29521 + k, extra) for k, (name, extra) in
            enumerate((("zero1", ["--method", "zero1"]), ("acco", []), ("int8", ["--compression", "int8"])))}
    world = len(small)
    assert all(s["layout"] == (len(hosts.hosts), PER_NODE) for s in small + runs["int8"])
    assert all(s["layout"] is None for s in runs["acco"])
    batches = make_batches(SEED, world, STEPS * GA * 6 + 8)

    def reference(ranks_per_node: int) -> list[torch.Tensor]:
        return list(reference_train(make_model(SEED), batches, loss_fn, mode="acco", num_steps=STEPS,
                                    gradient_accumulation_steps=GA, lr=LR, weight_decay=0.01,
                                    max_grad_norm=DEEPSPEED_DEFAULT_CLIP, estimate_shift=DEFAULT_ESTIMATE_SHIFT,
                                    estimate_micro_batches=DEFAULT_ESTIMATE_HALF[GA], estimate_compression="int8",
                                    block=16, ranks_per_node=ranks_per_node).values())

    diff = max(float((a - b).abs().max()) for a, b in zip(small[0]["params"], reference(PER_NODE)))
    diff_flat = max(float((a - b).abs().max()) for a, b in zip(small[0]["params"], reference(1)))
    params = runs["int8"][0]["n_params"]
    per_step = {name: [s["host_tx_bytes"] / STEPS for s in saved if s["host_tx_bytes"] is not None]
                for name, saved in runs.items()}
    assert all(len(v) == len(hosts.hosts) for v in per_step.values())
    estimate = [i - a / 2 for i, a in zip(per_step["int8"], per_step["acco"])]
    formula = int8_estimate_fraction(world, PER_NODE, 4) * 2 * (world - 1) / world * 4 * params
    print(f"PARITY node-aware 2x2 vs reference: {diff:.3e} (vs the flat round's reference {diff_flat:.3e})")
    print(f"BYTES per host per step ({params:,} parameters): ZeRO-1 {per_step['zero1']}, ACCO {per_step['acco']}, "
          f"int8 {per_step['int8']}; the int8 estimate round adds {estimate} = "
          f"{[round(e / z, 3) for e, z in zip(estimate, per_step['zero1'])]} x ZeRO-1's; planner {formula:,.0f} "
          f"({[round(e / formula - 1, 3) for e in estimate]})")
    assert diff < 1e-6 and diff_flat > 10 * diff
    assert all(abs(e / formula - 1) < BYTES_TOL for e in estimate)


# -- the automatic schedule on a link that slows down mid-run --------------------------------------------------------

AUTO_STEPS, SHAPE_AT, SLOW_MBIT, BUSY_S = 32, 16, 0.5, 0.005


@pytest.mark.multinode
@pytest.mark.timeout(LAUNCH_TIMEOUT_S + 60)
def test_automatic_schedule_follows_a_slower_link(hosts: FakeHosts, tmp_path: Path) -> None:
    """``{"enabled": true}`` alone on 2 fake hosts: the trials (sync, then 0.75 and 0.75+int8 where they can win)
    and a decision after them on the unshaped link; after step 16 each host shapes its link to 0.5 Mbit/s, and a
    new decision (M/C moved) comes and the schedule changes within twice ``SWITCH_WITHIN`` steps (a decision from a
    window that still holds unshaped steps may keep it; the shaping shows in the measurements late). Every rank
    ran the same schedules, and the parameters equal the reference's for the schedule sequence the run recorded
    (its switches restart the pipeline; the end of the trials only where the decision changes the schedule)."""
    hostfile = hosts.hostfile(tmp_path / "hostfile")
    out = str(tmp_path / "auto_{rank}.pt")
    cmds = [h.cmd([*_deepspeed_cli(), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(h.index),
                   "--master_addr", hosts.hosts[0].name, "--master_port", "29531", str(SCRIPT), "--out", out,
                   "--steps", str(AUTO_STEPS), "--ga", str(GA), "--auto", "--busy_s", str(BUSY_S),
                   "--shape_at", str(SHAPE_AT), "--shape_mbit", str(SLOW_MBIT)]) for h in hosts.hosts]
    rcs, output, wall = _launch(cmds, _launch_env())
    print(f"LAUNCH automatic schedule: {wall:.1f} s wall, return codes {rcs}")
    assert all(rc == 0 for rc in rcs), f"return codes {rcs}\n{output[-6000:]}"
    saved = [torch.load(out.format(rank=r)) for r in range(WORLD)]
    schedules, decisions = saved[0]["schedules"], saved[0]["decisions"]
    print(f"SCHEDULES {schedules}")
    for d in decisions:
        print(f"DECISION at step {d['step']}: {d['schedule']} ({d['why']}; M/C {d['m_over_c']}; {d['reason']})")
    assert len(schedules) == AUTO_STEPS and schedules == saved[1]["schedules"]
    tried = decisions[0]["why"].removeprefix("after trying ").split(", ")
    assert tried[0] == "sync" and set(tried) <= {t.name for t in TRIALS}
    trials = [t for t in tried for _ in range(TRIAL_STEPS)] + [tried[-1]]  # the last trial runs a step more
    assert schedules[:len(trials)] == trials
    assert decisions[0]["step"] == len(trials) and decisions == saved[1]["decisions"]
    after = [d for d in decisions if d["step"] > SHAPE_AT]
    assert after, "no decision after the link slowed"
    # The shaped link shows in the measurements late on the fake hosts (decisions seen at step 30 in 32-step runs).
    assert "M/C moved" in after[0]["why"] and after[0]["step"] <= SHAPE_AT + 2 * SWITCH_WITHIN, after[0]
    # A re-decision from a window that still holds unshaped steps may keep the schedule; the next one switches.
    changed = [d for d in after if schedules[d["step"]] != schedules[SHAPE_AT - 1]]
    assert changed and changed[0]["step"] <= SHAPE_AT + 2 * SWITCH_WITHIN, ("the schedule did not change", after)
    assert all(torch.equal(a, b) for a, b in zip(saved[0]["params"], saved[1]["params"]))
    expected = reference_train(make_model(SEED), make_batches(SEED, WORLD, AUTO_STEPS * GA * 6 + 8), loss_fn,
                               mode="acco", num_steps=AUTO_STEPS, gradient_accumulation_steps=GA, lr=LR,
                               weight_decay=0.01, max_grad_norm=DEEPSPEED_DEFAULT_CLIP,
                               estimate_shift=DEFAULT_ESTIMATE_SHIFT, estimate_compression="int8", block=256,
                               **replay_schedules(schedules, WORLD, GA))
    diff = max(float((a - b).abs().max()) for a, b in zip(saved[0]["params"], expected.values()))
    print(f"PARITY automatic schedule vs the reference of its recorded schedules: {diff:.3e}")
    assert diff < TOL
