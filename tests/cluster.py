"""A throwaway SLURM cluster on this machine, for the launcher tests.

munge + one slurmctld + three slurmd daemons: one for the real host and two emulated nodes (same
host, own ports and spool dirs, `slurmd -N name`), all state in a temp dir, on free ports, torn
down by PID. Facts behind each setting: ../shared/CLUSTER_TESTING.md. Nothing is mocked: jobs
run through the real sbatch/srun/scontrol.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time

import pytest

BINARIES = ("slurmctld", "slurmd", "sbatch", "scontrol", "munged", "munge")


def missing(ci: bool, what: str) -> None:
    msg = f"{what} (apt-get install slurmctld slurmd slurm-client munge openmpi-bin; pip install mpi4py)"
    if ci:
        pytest.fail(msg + ": CI must provide it (.ci/run installs it)")
    pytest.skip(msg)


def free_ports(k: int) -> list[int]:
    socks = []
    for _ in range(k):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _which(name: str) -> str | None:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


class Cluster:
    def __init__(self, root: str):
        self.root = root
        self.host = socket.gethostname().split(".")[0]
        self.pids: list[int] = []
        self.started_munged: int | None = None
        cpus = os.cpu_count() or 1
        with open("/proc/meminfo") as f:
            mem_mib = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1)) // 1024
        ctl_port, *node_ports = free_ports(4)
        self.nodes = [self.host, "qnode1", "qnode2"]
        self.conf = os.path.join(root, "slurm.conf")
        for d in ("state", "spool", "log", "run"):
            os.makedirs(os.path.join(root, d), exist_ok=True)
        lines = [
            "ClusterName=qstartest",
            f"SlurmctldHost={self.host}(127.0.0.1)",
            f"SlurmctldPort={ctl_port}",
            "AuthType=auth/munge", "SlurmUser=root", "SlurmdUser=root",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",          # no cgroups, no systemd
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "MpiDefault=none", "ReturnToService=2",
            "JobRequeue=1", "KillWait=30", "MinJobAge=600", "InactiveLimit=0",
            "AuthInfo=cred_expire=10",        # a requeued job waits cred_expire s before it may start (default 120)
            f"StateSaveLocation={root}/state", f"SlurmdSpoolDir={root}/spool/%n",
            f"SlurmctldPidFile={root}/run/slurmctld.pid", f"SlurmdPidFile={root}/run/slurmd-%n.pid",
            f"SlurmctldLogFile={root}/log/slurmctld.log", f"SlurmdLogFile={root}/log/slurmd-%n.log",
            "SlurmctldDebug=info", "SlurmdDebug=info",
            f"NodeName={self.host} NodeAddr=127.0.0.1 Port={node_ports[0]} CPUs={cpus} RealMemory={mem_mib // 3}",
        ]
        for name, port in zip(self.nodes[1:], node_ports[1:]):
            lines.append(f"NodeName={name} NodeHostname={self.host} NodeAddr=127.0.0.1 Port={port} "
                         f"CPUs={cpus} RealMemory={mem_mib // 3}")
        lines.append("PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    # ---- lifecycle ------------------------------------------------------------------------
    def start(self) -> None:
        self._munge()
        self._spawn([_which("slurmctld"), "-f", self.conf, "-c"])
        self.pids.append(self._pid(os.path.join(self.root, "run", "slurmctld.pid")))
        for node in self.nodes:
            os.makedirs(os.path.join(self.root, "spool", node), exist_ok=True)
            self._spawn([_which("slurmd"), "-f", self.conf, "-N", node])
            self.pids.append(self._pid(os.path.join(self.root, "run", f"slurmd-{node}.pid")))
        deadline = time.time() + 60
        while time.time() < deadline:
            out = self.run(["sinfo", "-h", "-N", "-t", "idle", "-o", "%N"], check=False).stdout.split()
            if set(self.nodes) <= set(out):
                return
            time.sleep(0.5)
        raise RuntimeError(f"nodes did not become idle: {self.run(['sinfo', '-N'], check=False).stdout}"
                           f"\n{self.log('slurmctld')[-2000:]}")

    def _munge(self) -> None:
        if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
            return
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", _which("munged")], check=True)
        for _ in range(50):
            if subprocess.run("munge -n | unmunge", shell=True, capture_output=True).returncode == 0:
                break
            time.sleep(0.1)
        self.started_munged = self._pid("/run/munge/munged.pid")

    def _spawn(self, cmd: list[str]) -> None:
        subprocess.run(cmd, env=self.env, check=True, capture_output=True, timeout=60)   # daemonises

    @staticmethod
    def _pid(path: str) -> int:
        for _ in range(100):
            if os.path.exists(path):
                text = open(path).read().strip()
                if text:
                    return int(text)
            time.sleep(0.1)
        raise RuntimeError(f"{path} never appeared")

    def stop(self) -> None:
        if self.pids:
            self.run(["scancel", "--full", "--user=root"], check=False)
        for pid in reversed(self.pids + ([self.started_munged] if self.started_munged else [])):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.time() + 20
        for pid in self.pids:
            while time.time() < deadline:
                try:
                    os.kill(pid, 0)
                except ProcessLookupError:
                    break
                time.sleep(0.1)

    # ---- jobs -----------------------------------------------------------------------------
    def run(self, cmd: list[str], check: bool = True, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(cmd, env=kw.pop("env", self.env), capture_output=True, text=True, check=check,
                              timeout=kw.pop("timeout", 60), **kw)

    def submit(self, script: str, sbatch_args: list[str], script_args: list[str], env: dict | None = None,
               cwd: str | None = None) -> int:
        res = self.run(["sbatch", "--parsable"] + sbatch_args + [script] + script_args,
                       env=dict(self.env, **(env or {})), cwd=cwd)
        return int(res.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: int, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                          "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            time.sleep(0.5)
        self.run(["scancel", str(job_id)], check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s")

    def log(self, name: str) -> str:
        path = os.path.join(self.root, "log", f"{name}.log")
        return open(path).read() if os.path.exists(path) else ""


def bring_up(root: str, ci: bool) -> Cluster:
    for b in BINARIES:
        if _which(b) is None:
            missing(ci, f"SLURM/munge binary {b!r} not found")
    c = Cluster(root)
    try:
        c.start()
    except Exception:
        c.stop()
        raise
    return c
