"""ACCO benchmark on two fake hosts: ZeRO-1 vs ACCO (plain and int8 estimate) vs DPU vs adaptive ACCO.

Two network namespaces (``tests/netns.py``) joined by a veth pair, each running one rank of
``benchmarks/worker.py`` with one thread, pinned to its own core (``taskset``), started with the
``env://`` rendezvous (``ip netns exec hostK env RANK=K WORLD_SIZE=2 ... python benchmarks/worker.py``).
The link is shaped with ``tc tbf`` (both ends, full duplex) at bandwidths derived from a calibration
run, so that ZeRO-1's ratio M/C (one round: reduce-scatter + sharded step + all-gather, against the
compute of one optimizer step) spans the requested range, plus the unshaped link. For every bandwidth
the cases run on the same model, data and batch; repetitions are the outer loop, bandwidths and methods
are shuffled inside, so machine noise hits all alike. ``--presets`` runs the whole sweep for each model
(``--quick``: the tiny GPT-2, whose micro-batch is mostly Python overhead, and the compute-dense
``dense`` preset, whose micro-batch is matrix products), each with its own calibration. A heterogeneous
run (first model only) then slows one host's compute for real (a CPU-bandwidth quota of its cgroup:
cgroup v2 ``cpu.max`` or v1 ``cpu.cfs_quota_us``) and compares ZeRO-1 with adaptive ACCO against the
sum of the workers' standalone rates.

    flock /tmp/acco-cpu.lock python benchmarks/run.py --quick --out benchmarks/results/quick.json
    python benchmarks/run.py --smoke --out /tmp/smoke.json          # < 2 minutes, same schema

``--time_to_target`` runs the time-to-target comparison instead (``benchmarks/time_to_target.py``: ZeRO-1's
held-out loss after a fixed budget is the target, every method trains until it reaches it).

Needs root (namespaces, tc, cgroups). Writes the JSON (``{"runs", "summary", "machine", "command",
"calibration"}``, the calibration per model preset), then ``benchmarks/report.py`` turns it into a markdown
table and PNG plots next to it.
Namespaces, qdiscs and the cgroup are removed at exit, also on Ctrl-C or failure; every subprocess
runs under a timeout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.worker import CASES, METHODS  # noqa: E402
from tests.netns import FakeHosts  # noqa: E402

__all__ = ["main", "parse_args", "check_resume", "write_run_identity", "preset_args", "run_preset", "summarize_case",
           "derive_bandwidths", "calibrate", "CpuQuota"]

WORKER = ROOT / "benchmarks" / "worker.py"
TTT_METHODS = ("zero1", "acco", "acco_int8", "dpu", "acco_adaptive", "acco_adaptive_sqrt", "acco_auto")
"""The time-to-target methods: adaptive ACCO with each LR rule (``acco.lr_scaling`` none and sqrt)."""
RANKS = 2


# ---------------------------------------------------------------------------------------- args
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments; ``--quick`` and ``--smoke`` fill defaults for the unset ones."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true",
                      help="2 models x (unshaped + 5 bandwidths) x 3 repetitions + heterogeneous (about 2.5 h on "
                           "a 2-core AMD EPYC VM; --resume continues an interrupted one)")
    mode.add_argument("--smoke", action="store_true", help="1 bandwidth, 1 repetition, few steps (<2 min)")
    p.add_argument("--out", default="benchmarks/results/quick.json", help="JSON results file")
    p.add_argument("--ratios", default=None,
                   help="ZeRO-1 M/C ratios the bandwidths are derived for (comma-separated; 0 = the unshaped link; "
                        "quick: 0,0.25,0.5,1,2,3)")
    p.add_argument("--reps", type=int, default=None, help="repetitions (quick: 3)")
    p.add_argument("--steps", type=int, default=None,
                   help="committed optimizer steps per run (quick: 14 for tiny, 8 for dense)")
    p.add_argument("--skip", type=int, default=None, help="first steps excluded from step-time medians (quick: 2)")
    p.add_argument("--methods", default=None,
                   help=f"cases of the homogeneous runs (default: {','.join(METHODS)}; with --time_to_target: "
                        f"{','.join(TTT_METHODS)}, zero1 first: it sets the target)")
    p.add_argument("--presets", default=None,
                   help="examples/train_lm.py model presets, one sweep each (quick: tiny,dense; smoke: tiny)")
    p.add_argument("--micro_batch", type=int, default=None, help="micro-batch (default: 8 for tiny, 4 for dense)")
    p.add_argument("--ga", type=int, default=4)
    p.add_argument("--estimate_fraction", type=float, default=None,
                   help="acco.estimate_fraction of the ACCO cases (default: the package's, 0.75; 0.5: equal halves, "
                   "as the committed results before it became the default)")
    p.add_argument("--hetero_slowdown", type=float, default=3.0,
                   help="the slow host gets 1/this of its core (cgroup CPU quota); 0 disables the heterogeneous run")
    p.add_argument("--hetero_ratio", type=float, default=0.5,
                   help="the heterogeneous run uses the bandwidth derived for this ZeRO-1 M/C")
    p.add_argument("--probe_s", type=float, default=3.0, help="standalone compute probe per worker (seconds)")
    p.add_argument("--launch_timeout_s", type=float, default=None, help="kill a launch after this (default: derived)")
    p.add_argument("--seed", type=int, default=0, help="shuffling of the run order")
    p.add_argument("--no_report", action="store_true", help="do not write the markdown table and plots")
    p.add_argument("--resume", metavar="LOGDIR", default=None,
                   help="continue an interrupted run: its log directory (printed at its start as 'logs: ...'); "
                        "launches that finished there are read back instead of run again. Refused unless the "
                        "settings and the machine's CPU are those of the interrupted run")
    p.add_argument("--summarize", nargs="+", metavar="RAW", default=None,
                   help="real nodes: no fake hosts; summarize worker.py outputs (one file per repetition of the "
                        "same setting, e.g. from `deepspeed --hostfile ... benchmarks/worker.py --out RAW`) into "
                        "--out and the report")
    p.add_argument("--link_mbit", type=float, default=0.0, help="with --summarize: the real link's speed (label)")
    ttt = p.add_argument_group("time to target (benchmarks/time_to_target.py)")
    ttt.add_argument("--time_to_target", action="store_true",
                     help="instead of the step-time sweep: ZeRO-1 trains --steps steps and its final held-out loss "
                          "is the target; every method then trains until it reaches it or the cap (quick: tiny, "
                          "M/C 0.5, 2 and 4, 3 seeds, 40-step budget; about 20 min for four methods on a 2-core VM)")
    ttt.add_argument("--seeds", default=None, help="model/data seeds, one launch per seed and M/C (quick: 1,2,3)")
    ttt.add_argument("--eval_every_steps", type=float, default=None,
                     help="evaluate every this many of ZeRO-1's steps' worth of tokens (quick: 4)")
    ttt.add_argument("--cap_factor", type=float, default=None,
                     help="stop a method unreached at this x ZeRO-1's wall-clock (default 2)")
    args = p.parse_args(argv)
    if args.time_to_target:
        preset = {"ratios": "0.5", "skip": 1, "presets": "tiny", "seeds": "1", "steps": 6, "eval_every_steps": 2,
                  "methods": ",".join(TTT_METHODS)} if args.smoke else \
            {"ratios": "0.5,2,4", "skip": 2, "presets": "tiny", "seeds": "1,2,3", "steps": 40, "eval_every_steps": 4,
             "methods": ",".join(TTT_METHODS)}
        preset.update(reps=1, cap_factor=2.0)
        args.hetero_slowdown = 0.0
    else:
        preset = {"ratios": "0.5", "reps": 1, "skip": 2, "presets": "tiny"} if args.smoke else \
            {"ratios": "0,0.25,0.5,1,2,3", "reps": 3, "skip": 2, "presets": "tiny,dense"}
        preset["methods"] = ",".join(METHODS)
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ratio_list = [float(r) for r in str(args.ratios).split(",") if r]
    args.method_list = [m for m in args.methods.split(",") if m]
    args.preset_list = [m for m in args.presets.split(",") if m]
    args.seed_list = [int(x) for x in str(args.seeds or "").split(",") if x]
    unknown = [m for m in args.method_list if m not in CASES]
    if unknown:
        p.error(f"--methods: unknown {unknown}; choose from {', '.join(CASES)}")
    if args.time_to_target and (args.method_list[:1] != ["zero1"] or len(args.preset_list) != 1):
        p.error("--time_to_target: --methods must start with zero1 (it sets the target) and --presets name one model")
    if args.ga % 2:
        p.error("--ga must be even (ACCO splits a step into two rounds)")
    return args


# ------------------------------------------------------------------------------- cgroup quota
class CpuQuota:
    """A cgroup whose CPU bandwidth is ``1/slowdown`` of one core (v2 ``cpu.max`` or v1 ``cfs_quota_us``)."""

    PERIOD_US = 20_000

    def __init__(self, slowdown: float) -> None:
        self.slowdown = slowdown
        name = f"acco_bench_{os.getpid()}"
        v2 = Path("/sys/fs/cgroup")
        if (v2 / "cgroup.controllers").exists() and "cpu" in (v2 / "cgroup.controllers").read_text().split():
            self.version = "v2"
            self.path = v2 / name
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{int(self.PERIOD_US / slowdown)} {self.PERIOD_US}")
        elif Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").exists():
            self.version = "v1"
            self.path = Path("/sys/fs/cgroup/cpu") / name
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text(str(self.PERIOD_US))
            (self.path / "cpu.cfs_quota_us").write_text(str(int(self.PERIOD_US / slowdown)))
        else:
            raise RuntimeError("no writable cgroup CPU controller (v2 cpu.max or v1 cpu.cfs_quota_us)")

    def describe(self) -> str:
        """How the slowdown is applied, for the report."""
        knob = "cpu.max" if self.version == "v2" else "cpu.cfs_quota_us/cpu.cfs_period_us"
        quota = int(self.PERIOD_US / self.slowdown)
        return (f"cgroup {self.version} {knob} = {quota}/{self.PERIOD_US} us on the slow rank's process "
                f"(all its threads), pinned to its own core: {1 / self.slowdown:.0%} of one core")

    def wrap(self, argv: list[str]) -> list[str]:
        """``argv`` started inside the cgroup (the shell joins it, then execs)."""
        procs = self.path / "cgroup.procs"
        return ["sh", "-c", f'echo $$ > {shlex.quote(str(procs))} && exec "$@"', "sh", *argv]

    def remove(self) -> None:
        """Delete the cgroup (its processes are gone by then)."""
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except FileNotFoundError:
                return
            except OSError:
                time.sleep(0.1)


# ------------------------------------------------------------------------------------ resuming
RESUME_IGNORED = ("out", "resume", "no_report")
"""Settings that may differ between an interrupted run and its continuation."""


def _run_identity(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: v for k, v in vars(args).items() if k not in RESUME_IGNORED}
    return {"settings": settings, "cpu": machine_info()["cpu"]}


def write_run_identity(log_dir: Path, args: argparse.Namespace) -> str | None:
    """Record the settings and CPU of a new run in its log directory (what ``--resume`` checks)."""
    (log_dir / "run_identity.json").write_text(json.dumps(_run_identity(args), indent=1) + "\n")
    return None


def check_resume(log_dir: Path, args: argparse.Namespace) -> str | None:
    """None if ``log_dir`` holds an interrupted run with these settings on this CPU, else why not."""
    path = log_dir / "run_identity.json"
    if not path.exists():
        return f"--resume {log_dir}: no run_identity.json there (not a log directory of benchmarks/run.py)"
    saved, now = json.loads(path.read_text()), json.loads(json.dumps(_run_identity(args)))
    if saved["cpu"] != now["cpu"]:
        return f"--resume {log_dir}: that run ran on {saved['cpu']!r}, this machine is {now['cpu']!r}; start a new run"
    differ = sorted(k for k in set(saved["settings"]) | set(now["settings"])
                    if saved["settings"].get(k) != now["settings"].get(k)
                    and not (k not in saved["settings"] and now["settings"][k] in (None, False, [])))
    if differ:
        return (f"--resume {log_dir}: settings differ from the interrupted run's: "
                + ", ".join(f"{k} (was {saved['settings'].get(k)!r}, now {now['settings'].get(k)!r})" for k in differ)
                + "; pass the same options as it had")
    return None


# ------------------------------------------------------------------------------------ launches
class Launcher:
    """Starts the two ranks of a worker job on the fake hosts and waits for them (with a timeout)."""

    def __init__(self, hosts: FakeHosts, args: argparse.Namespace, log_dir: Path) -> None:
        self.hosts, self.args, self.log_dir = hosts, args, log_dir
        self.port = 29600
        self.count = 0

    def run(self, tag: str, methods: list[str], steps: int, timeout_s: float, probe_s: float = 0.0,
            slow: CpuQuota | None = None, extra: list[str] | None = None) -> dict[str, Any]:
        """Run ``methods`` in one worker job (both ranks, ``extra`` worker arguments); return rank 0's JSON."""
        self.count += 1
        self.port += 1
        out = self.log_dir / f"{self.count:02d}_{tag}.json"
        if out.exists():  # --resume: this launch finished in the interrupted run
            return json.loads(out.read_text())
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        worker_args = ["--methods", ",".join(methods), "--steps", str(steps), "--preset", self.args.preset,
                       "--micro_batch", str(self.args.micro_batch), "--ga", str(self.args.ga),
                       "--probe_s", str(probe_s), "--timeout_s", str(max(60.0, timeout_s)), *(extra or [])]
        if self.args.estimate_fraction is not None:
            worker_args += ["--estimate_fraction", str(self.args.estimate_fraction)]
        try:
            for k in reversed(range(RANKS)):  # rank 1 first: rank 0 hosts the store
                env = ["env", f"RANK={k}", f"WORLD_SIZE={RANKS}", "LOCAL_RANK=0", "LOCAL_SIZE=1",
                       f"MASTER_ADDR={self.hosts.hosts[0].addr}", f"MASTER_PORT={self.port}",
                       "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "DS_ACCELERATOR=cpu", "GLOO_SOCKET_IFNAME=eth0",
                       "PYTHONUNBUFFERED=1", "TOKENIZERS_PARALLELISM=false"]
                argv = env + [sys.executable, str(WORKER), *worker_args] + (["--out", str(out)] if k == 0 else [])
                argv = ["taskset", "-c", str(k % (os.cpu_count() or 1))] + self.hosts.hosts[k].cmd(argv)
                if slow is not None and k == RANKS - 1:
                    argv = slow.wrap(argv)
                log = (self.log_dir / f"{self.count:02d}_{tag}_rank{k}.log").open("wb")
                logs.append(log)
                procs.append(subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                              cwd=ROOT))
            deadline = time.monotonic() + timeout_s
            for proc in procs:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            failed = [p.returncode for p in procs if p.returncode != 0]
            if failed or not out.exists():
                raise RuntimeError(f"launch {tag} failed (rc {[p.returncode for p in procs]}):\n" + self._tails(tag))
        except subprocess.TimeoutExpired as exc:
            raise RuntimeError(f"launch {tag} timed out after {timeout_s:.0f} s:\n" + self._tails(tag)) from exc
        finally:
            for proc in procs:
                if proc.poll() is None:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                    proc.wait(timeout=10)
            for log in logs:
                log.close()
        result: dict[str, Any] = json.loads(out.read_text())
        return result

    def _tails(self, tag: str) -> str:
        text = []
        for log in sorted(self.log_dir.glob(f"{self.count:02d}_{tag}_rank*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            text.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(text)


# ---------------------------------------------------------------------------------- summaries
def _median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize_case(case: dict[str, Any], skip: int) -> dict[str, Any]:
    """One run's figures from the worker's raw per-rank records (medians over steps after ``skip``)."""
    ranks = case["ranks"]
    r0 = ranks[0]
    steps, ga, world, tpm = r0["steps"], r0["ga"], r0["world_size"], r0["tokens_per_micro_batch"]
    acco = r0["acco"]
    rounds_per_step = 2 if case["case"] in ("acco", "acco_int8", "acco_adaptive", "acco_half", "acco_half_int8",
                                            "acco_int8_commit") \
        or (case["case"] == "acco_auto" and r0.get("auto_schedule") not in (None, "sync")) else 1
    excluded = set(range(1, skip + 1)) | set(r0["paused_steps"])
    decisions = r0.get("auto_decisions") or []
    if decisions:  # the automatic schedule: its trials and the first step of its choice are left out
        excluded |= set(range(1, decisions[0]["step"] + 2))
    kept = [s for s in range(1, steps + 1) if s not in excluded] or list(range(1, steps + 1))

    def step_times(rank: dict[str, Any]) -> dict[int, float]:
        t = [0.0] + rank["commit_t"]
        return {s: t[s] - t[s - 1] for s in range(1, len(t))}

    per_rank_step = [_median([step_times(r)[s] for s in kept]) for r in ranks]
    step_time = statistics.mean(per_rank_step)

    # Global micro-batches of each step (adaptive: from the round counts; otherwise fixed).
    if acco:
        by_step = {rec["step"]: rec for rec in r0["records"]}
        micro_per_step = {s: by_step[s]["micro_batches"] if s in by_step else ga * world for s in range(1, steps + 1)}
    else:
        micro_per_step = dict.fromkeys(range(1, steps + 1), ga * world)
    tokens = sum(micro_per_step.values()) * tpm

    compute: list[float] = []
    comm: list[float] = []
    exposed: list[float] = []
    estimate_round: list[float] = []
    commit_round: list[float] = []
    for rank in ranks:
        if acco:
            recs = {rec["step"]: rec for rec in rank["records"]}
            rs = [recs[s] for s in kept if s in recs]
            compute.append(_median([r["compute_s"] for r in rs]))
            comm.append(_median([r["commit_round_s"] + (r["estimate_round_s"] or 0.0) for r in rs]))
            exposed.append(_median([r["exposed_wait_s"] for r in rs]))
            estimate_round.append(_median([r["estimate_round_s"] for r in rs]))
            commit_round.append(_median([r["commit_round_s"] for r in rs]))
        else:
            # A ZeRO-1 step: GA-1 plain micro-batches, then the boundary micro-batch whose backward/step
            # also reduces, steps the shard and all-gathers. M = boundary micro-batch - a plain one.
            extra = []
            comp = []
            for s in kept:
                plain = rank["micro_s"][s - 1]
                base = statistics.median(plain) if plain else 0.0
                m = max(0.0, rank["micro_boundary_s"][s - 1] - base)
                extra.append(m)
                comp.append(step_times(rank)[s] - m)
            comm.append(_median(extra))
            exposed.append(_median(extra))
            compute.append(_median(comp))
    compute_s = statistics.mean(compute)
    comm_s = statistics.mean(comm)
    m = comm_s / rounds_per_step

    # Throughput over the kept window (pauses for the equal-token evaluation are excluded from commit_t).
    first = kept[0]
    window_t = statistics.mean(r["commit_t"][steps - 1] - (r["commit_t"][first - 2] if first > 1 else 0.0)
                               for r in ranks)
    window_micro = sum(micro_per_step[s] for s in range(first, steps + 1))
    tokens_per_s = window_micro * tpm / window_t
    samples_per_s = window_micro * r0["micro_batch"] / window_t

    loss_curve = []
    cum = 0
    for s in range(1, steps + 1):
        cum += micro_per_step[s] * tpm
        weights = [r["step_local_micro"][s - 1] for r in ranks]
        loss = sum(r["step_loss"][s - 1] * w for r, w in zip(ranks, weights)) / sum(weights)
        loss_curve.append({"step": s, "tokens": cum, "wall_s": statistics.mean(r["commit_t"][s - 1] for r in ranks),
                           "loss": loss})
    mid = r0.get("mid_eval")
    cap = case.get("max_micro_batches_per_round")
    rounds = [counts for rec in r0["records"] if rec["step"] in kept for counts in rec["round_counts"]]
    return {
        "method": case["method"], "case": case["case"], "adaptive_accumulation": r0["adaptive_accumulation"],
        "auto_schedule": r0.get("auto_schedule"), "auto_decisions": r0.get("auto_decisions"),
        "estimate_fraction": r0.get("estimate_fraction"), "steps": steps, "tokens": tokens,
        "samples": tokens // r0["seq_len"],
        "step_time_s": step_time, "step_time_s_per_rank": per_rank_step,
        "compute_s": compute_s, "comm_s": comm_s, "round_s": m, "rounds_per_step": rounds_per_step,
        "estimate_round_s": _median(estimate_round), "commit_round_s": _median(commit_round),
        "exposed_comm_s": statistics.mean(exposed), "tokens_per_s": tokens_per_s, "samples_per_s": samples_per_s,
        "micro_batches_per_step": window_micro / (steps - first + 1),
        "final_loss": r0["final_eval_loss"],
        "loss_at_equal_tokens": mid["eval_loss"] if mid else r0["final_eval_loss"],
        "equal_tokens_eval_tokens": mid["tokens"] if mid else tokens,
        "bytes_per_step": statistics.mean(r["tx_bytes"] for r in ranks) / steps,
        "bytes_per_step_metrics": (statistics.mean(sum(x["bytes_communicated"] for x in r["records"]) for r in ranks)
                                   / steps) if acco else None,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in ranks), "peak_rss_mb_per_rank": [r["peak_rss_mb"] for r in ranks],
        "ru_maxrss_mb_per_rank": [r["ru_maxrss_mb"] for r in ranks],
        "n_params": r0["n_params"], "micro_batch": r0["micro_batch"], "ga": ga, "seq_len": r0["seq_len"],
        "loss_curve": loss_curve, "train_s": statistics.mean(r["train_s"] for r in ranks),
        "micro_batches_per_round_per_rank": [statistics.mean(c[k] for c in rounds) for k in range(world)]
        if rounds else None,
        "rounds_at_cap_share": (sum(max(c) >= cap for c in rounds) / len(rounds)) if rounds and cap else None,
        "main_thread_cpu_s_per_step": statistics.mean(r["thread_cpu_s"].get("main", 0.0) for r in ranks) / steps,
        "background_cpu_s_per_step": statistics.mean(sum(v for k, v in r["thread_cpu_s"].items() if k != "main")
                                                     for r in ranks) / steps,
    }


def derive_bandwidths(calib: dict[str, Any], ratios: list[float]) -> dict[float, float]:
    """Mbit/s giving ZeRO-1 a round time M = ratio * C (ratio 0: 0.0, the unshaped link).

    Model: M(B) = M_unshaped + a * (tx_bits / B) ** g. Before the shaped calibration points are
    measured, a = g = 1 (the link moves the bytes at the nominal rate); ``calibrate`` fits a and g
    through two shaped points (TCP over tbf reaches a bit less than the rate, and less so the slower
    the link, so g is slightly above 1).
    """
    c, m0, bits = calib["C_s"], calib["M_unshaped_s"], calib["tx_bytes_per_step"] * 8
    a, g = calib.get("fit_a", 1.0), calib.get("fit_g", 1.0)
    out = {}
    for r in ratios:
        if r == 0:  # the unshaped link
            out[r] = 0.0
            continue
        link_s = r * c - m0
        if link_s <= 0.02 * c:
            raise RuntimeError(f"M/C = {r} is below the unshaped ratio {m0 / c:.2f}; choose larger ratios")
        out[r] = bits / (link_s / a) ** (1.0 / g) / 1e6
    return out


def calibrate(launcher: Launcher, hosts: FakeHosts, args: argparse.Namespace, progress: Progress) -> dict[str, Any]:
    """Measure ZeRO-1's C and M unshaped and at two shaped bandwidths; derive the benchmark's bandwidths.

    Three short ZeRO-1 runs: unshaped (C, the non-link part M_unshaped of a round, bytes sent per
    step on eth0, and the standalone compute probe), then at the bandwidths the linear model gives for
    M/C = 0.5 and 2, through which ``derive_bandwidths``'s power law is fitted.
    """
    import math

    steps = max(6, args.skip + 4)
    progress.log("calibration 1/3: ZeRO-1 on the unshaped link, standalone compute probe")
    hosts.unshape()
    raw = launcher.run("calibration_unshaped", ["zero1"], steps, timeout_s=240, probe_s=args.probe_s)
    progress.done += 1
    free = summarize_case(raw["cases"][0], min(args.skip, steps - 2))
    cal: dict[str, Any] = {"C_s": free["compute_s"], "M_unshaped_s": free["comm_s"],
                           "tx_bytes_per_step": free["bytes_per_step"], "step_time_unshaped_s": free["step_time_s"],
                           "probe": raw["probe"], "n_params": free["n_params"], "steps": steps,
                           "model": f"gpt2 {args.preset}", "micro_batch": args.micro_batch, "ga": args.ga,
                           "seq_len": free["seq_len"], "shaped_points": []}
    points = []
    for i, ratio in enumerate((0.5, 2.0)):
        mbit = derive_bandwidths(cal, [ratio])[ratio]
        progress.log(f"calibration {i + 2}/3: ZeRO-1 at {mbit:.1f} Mbit/s (linear model: M/C = {ratio:g})")
        hosts.shape(round(mbit, 3))
        raw = launcher.run(f"calibration_{mbit:.0f}mbit", ["zero1"], steps, timeout_s=240)
        progress.done += 1
        shaped = summarize_case(raw["cases"][0], min(args.skip, steps - 2))
        points.append((mbit, shaped))
        cal["shaped_points"].append({"mbit": mbit, "C_s": shaped["compute_s"], "M_s": shaped["comm_s"],
                                     "tx_bytes_per_step": shaped["bytes_per_step"]})
    hosts.unshape()
    cal["C_s"] = statistics.mean([free["compute_s"]] + [p["compute_s"] for _, p in points])
    bits = cal["tx_bytes_per_step"] * 8
    xs = [math.log(bits / (mbit * 1e6)) for mbit, _ in points]
    ys = [math.log(max(p["comm_s"] - cal["M_unshaped_s"], 1e-4)) for _, p in points]
    g = (ys[1] - ys[0]) / (xs[1] - xs[0]) if xs[1] != xs[0] else 1.0
    g = min(max(g, 0.5), 2.0)
    cal["fit_g"] = g
    cal["fit_a"] = math.exp(ys[1] - g * xs[1])
    ratios = sorted(set(args.ratio_list) | ({args.hetero_ratio} if args.hetero_slowdown > 0 else set()))
    bandwidths = derive_bandwidths(cal, ratios)
    cal["bandwidth_mbit_for_ratio"] = {str(r): b for r, b in bandwidths.items()}
    progress.log(f"calibration: C = {cal['C_s']:.3f} s/step, M(unshaped) = {cal['M_unshaped_s']:.3f} s, "
                 + ", ".join(f"M({m:.0f} Mbit/s) = {p['comm_s']:.3f} s" for m, p in points)
                 + f", {cal['tx_bytes_per_step'] / 1e6:.2f} MB sent per step per rank, fit M = M0 + "
                 f"{cal['fit_a']:.2f} (bits/B)^{g:.2f}, {free['n_params']:,} params -> "
                 + ", ".join(f"M/C {r:g}: {b:.1f} Mbit/s" for r, b in bandwidths.items()))
    return cal


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on."""
    import deepspeed
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cpu": cpu, "cores": os.cpu_count(), "kernel": platform.release(), "python": platform.python_version(),
            "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
            "fake_hosts": "tests/netns.py: 2 network namespaces, veth eth0, tc tbf",
            "threads_per_rank": 1, "pinning": "taskset: rank k on core k", **_git_state()}


def _git_state() -> dict[str, Any]:
    """The commit measured, and the package files that differed from it."""
    def git(*argv: str) -> str:
        try:
            return subprocess.run(["git", *argv], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.rstrip()
        except (OSError, subprocess.SubprocessError):
            return ""

    return {"git_commit": git("rev-parse", "HEAD"),
            "git_modified": git("status", "--porcelain", "--", "deepspeed_acco", "ds_configs", "benchmarks",
                                "examples").splitlines()}


@contextmanager
def signals_raise() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into KeyboardInterrupt so that the clean-up in ``finally`` runs."""
    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Progress:
    """Prints one line per launch with elapsed time."""

    def __init__(self, total: int) -> None:
        self.total, self.done, self.t0 = total, 0, time.monotonic()

    def log(self, message: str) -> None:
        """One progress line."""
        print(f"[{time.monotonic() - self.t0:6.0f} s | {self.done}/{self.total}] {message}", flush=True)


# ------------------------------------------------------------------------------------------ main
def summarize_files(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any]:
    """The result JSON of worker.py outputs gathered on real nodes (one file per repetition)."""
    runs = []
    first: dict[str, Any] | None = None
    for rep, path in enumerate(args.summarize):
        raw = json.loads(Path(path).read_text())
        first = first or raw
        for order_index, case in enumerate(raw["cases"]):
            run = summarize_case(case, args.skip)
            run.update(preset=raw["args"]["preset"], rep=rep, bandwidth_mbit=args.link_mbit, target_ratio=0.0,
                       heterogeneous=False, order_in_job=order_index, source=path)
            runs.append(run)
    assert first is not None, "--summarize needs at least one file"
    r0 = first["cases"][0]["ranks"][0]
    preset = first["args"]["preset"]
    calibration = {"model": f"gpt2 {preset}", "n_params": r0["n_params"],
                   "micro_batch": r0["micro_batch"], "ga": r0["ga"], "seq_len": r0["seq_len"], "C_s": float("nan"),
                   "M_unshaped_s": float("nan"), "tx_bytes_per_step": float("nan"),
                   "note": "real nodes: no calibration; see each run's M/C"}
    return {"command": " ".join(shlex.quote(a) for a in ["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
            "wall_s": 0.0, "machine": machine_info(), "calibration": {preset: calibration}, "settings": vars(args),
            "runs": runs}


PRESET_DEFAULTS = {"tiny": {"steps": 14, "smoke_steps": 5, "micro_batch": 8},
                   "dense": {"steps": 8, "smoke_steps": 4, "micro_batch": 4}}
"""Per model: optimizer steps per run (quick, smoke) and micro-batch, unless given on the command line."""


def preset_args(args: argparse.Namespace, preset: str) -> argparse.Namespace:
    """The settings of one model's sweep: ``args`` with this preset's steps and micro-batch filled in."""
    defaults = PRESET_DEFAULTS.get(preset, PRESET_DEFAULTS["tiny"])
    out = argparse.Namespace(**vars(args))
    out.preset = preset
    out.steps = args.steps or defaults["smoke_steps" if args.smoke else "steps"]
    out.micro_batch = args.micro_batch or defaults["micro_batch"]
    return out


def run_preset(pargs: argparse.Namespace, hosts: FakeHosts, launcher: Launcher, progress: Progress,
               rng: random.Random, quota: CpuQuota | None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Calibrate one model, then every (repetition, bandwidth, method) and, with ``quota``, the heterogeneous
    case; return (calibration, runs)."""
    launcher.args = pargs
    calibration = calibrate(launcher, hosts, pargs, progress)
    bandwidths = {float(r): b for r, b in calibration["bandwidth_mbit_for_ratio"].items()}
    per_step = max(0.5, calibration["C_s"] + calibration["M_unshaped_s"])
    if quota is not None:
        calibration["heterogeneous_mechanism"] = quota.describe()
    runs: list[dict[str, Any]] = []
    for rep in range(pargs.reps):
        order = list(bandwidths.items())
        rng.shuffle(order)
        jobs: list[tuple[str, float, float]] = [("homogeneous", r, b) for r, b in order if r in pargs.ratio_list]
        if quota is not None:
            jobs.insert(rng.randrange(len(jobs) + 1),
                        ("heterogeneous", pargs.hetero_ratio, bandwidths[pargs.hetero_ratio]))
        for kind, ratio, mbit in jobs:
            slow = quota if kind == "heterogeneous" else None
            methods = list(pargs.method_list) if slow is None else ["zero1", "acco_adaptive"]
            rng.shuffle(methods)
            if mbit > 0:
                hosts.shape(round(mbit, 3))
            else:
                hosts.unshape()
            worst = (1 + 3 * ratio) * per_step * (pargs.hetero_slowdown if slow else 1.0)
            timeout = pargs.launch_timeout_s or 90 + len(methods) * (20 + pargs.steps * worst * 2)
            link = f"{mbit:.1f} Mbit/s (M/C {ratio:g})" if mbit > 0 else "unshaped link"
            progress.log(f"{pargs.preset} rep {rep + 1}/{pargs.reps} {kind} {link}: {', '.join(methods)}")
            raw = launcher.run(f"{pargs.preset}_r{rep}_{kind[:6]}_{ratio:g}", methods, pargs.steps,
                               timeout_s=timeout, probe_s=pargs.probe_s if slow else 0.0, slow=slow)
            progress.done += 1
            for order_index, case in enumerate(raw["cases"]):
                run = summarize_case(case, pargs.skip)
                run.update(preset=pargs.preset, rep=rep, bandwidth_mbit=round(mbit, 3), target_ratio=ratio,
                           heterogeneous=slow is not None, order_in_job=order_index)
                if slow is not None:
                    run["standalone_probe"] = raw["probe"]
                    run["in_situ_samples_per_s"] = [
                        r["micro_batch"] / statistics.median(x for m in r["micro_s"][pargs.skip:] for x in m)
                        for r in case["ranks"]]
                    run["slowdown"] = pargs.hetero_slowdown
                runs.append(run)
                progress.log(f"  {run['case']:>13}: step {run['step_time_s']:.3f} s, C {run['compute_s']:.3f}"
                             f", comm {run['comm_s']:.3f}, exposed {run['exposed_comm_s']:.3f}, "
                             f"{run['tokens_per_s']:,.0f} tok/s, loss {run['final_loss']:.4f}")
    return calibration, runs


def main(argv: list[str] | None = None) -> int:
    """For every model: calibrate, run every (repetition, bandwidth, method) and (first model only) the
    heterogeneous case; write JSON and report."""
    args = parse_args(argv)
    if args.summarize:
        from benchmarks.report import add_derived, write_report

        result = summarize_files(args, argv)
        add_derived(result)
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
        for path in [Path(args.out)] + ([] if args.no_report else write_report(result, Path(args.out))):
            print(f"written: {path}", flush=True)
        return 0
    if os.geteuid() != 0:
        print("benchmarks/run.py needs root (network namespaces, tc, cgroups)", file=sys.stderr)
        return 2
    rng = random.Random(args.seed)
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    log_dir = Path(args.resume) if args.resume else Path(tempfile.mkdtemp(prefix="acco_bench_"))
    problem = check_resume(log_dir, args) if args.resume else write_run_identity(log_dir, args)
    if problem:
        print(problem, file=sys.stderr)
        return 2
    if args.time_to_target:
        from benchmarks.time_to_target import run_sweep

        return run_sweep(args, argv, log_dir)
    hetero = args.hetero_slowdown > 0
    n_launches = len(args.preset_list) * (3 + args.reps * len(args.ratio_list)) + (args.reps if hetero else 0)
    progress = Progress(n_launches)
    started, load_start = time.time(), os.getloadavg()
    runs: list[dict[str, Any]] = []
    calibrations: dict[str, Any] = {}
    quota: CpuQuota | None = None
    hosts = FakeHosts(2, prefix="accobench", subnet="10.232.0")
    print(f"logs: {log_dir}", flush=True)
    with signals_raise():
        try:
            hosts.up()
            launcher = Launcher(hosts, args, log_dir)
            if hetero:
                try:
                    quota = CpuQuota(args.hetero_slowdown)
                except (RuntimeError, OSError) as exc:  # no writable CPU controller: skip, say so
                    progress.total -= args.reps
                    progress.log(f"heterogeneous run skipped: {exc}")
            for index, preset in enumerate(args.preset_list):
                calibration, preset_runs = run_preset(preset_args(args, preset), hosts, launcher, progress, rng,
                                                      quota if index == 0 else None)
                calibrations[preset] = calibration
                runs += preset_runs
        finally:
            hosts.down()
            if quota is not None:
                quota.remove()
    from benchmarks.report import add_derived, write_report

    return save_result({"calibration": calibrations, "runs": runs}, args, argv, started, load_start, add_derived,
                       write_report)


def save_result(result: dict[str, Any], args: argparse.Namespace, argv: list[str] | None, started: float,
                load_start: tuple[float, float, float], derive: Any, report: Any) -> int:
    """Add the command, wall-clock, machine and settings to ``result``, derive, write ``--out`` and the report."""
    wall = time.time() - started
    result.update(command=" ".join(shlex.quote(a) for a in ["python", "benchmarks/run.py", *(argv or sys.argv[1:])]),
                  wall_s=wall, settings=dict(vars(args)),
                  machine={**machine_info(), "loadavg_start": load_start, "loadavg_end": os.getloadavg()})
    derive(result)
    out_path = Path(args.out)
    out_path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {out_path} ({wall:.0f} s)", flush=True)
    if not args.no_report:
        for path in report(result, out_path):
            print(f"report: {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
