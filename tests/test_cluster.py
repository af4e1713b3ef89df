"""Launchers against a real (throwaway, local) SLURM cluster and real MPI: slurm/owm_8node.sh on two
emulated nodes, pre-emption + requeue, kill -9 + resubmit, mpirun, the deepspeed launcher with a
hostfile. In CI these fail, not skip, when SLURM or MPI is missing (.ci/run installs them)."""
import json
import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from cluster import bring_up, free_ports, missing
from conftest import ci
from test_cli import steps_logged
from helpers import ROOT

pytestmark = pytest.mark.slow

OWM = os.path.join(ROOT, "slurm", "owm_8node.sh")
TRAIN = os.path.join(ROOT, "qstar_ds", "train.py")
STEPS, SAVE_EVERY = 12, 4
# the production script, shrunk from 8 nodes x 8 GPUs to 2 emulated nodes x 1 CPU rank
SBATCH = ["--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1", "--time=15"]
TRAIN_ARGS = ["--max_steps", str(STEPS), "--train.save_every", str(SAVE_EVERY), "--train.keep_last", "3"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = bring_up(str(tmp_path_factory.mktemp("slurm")), ci())
    yield c
    c.stop()


def submit(cluster, tmp_path, name: str, out_dir, extra: list[str] = ()) -> tuple[int, str]:
    log = str(tmp_path / f"{name}-%j.out")
    env = {"PRESET": "debug_cpu", "OUTPUT_DIR": str(out_dir), "PYTHON": sys.executable, "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    jid = cluster.submit(OWM, SBATCH + list(extra) + [f"--job-name={name}", f"--output={log}"], TRAIN_ARGS, env=env,
                         cwd=ROOT)
    return jid, log.replace("%j", str(jid))


def read(path: str) -> str:
    return open(path).read() if os.path.exists(path) else ""


def rank_lines(text: str, what: str) -> dict[int, int]:
    """{rank: step} of the per-rank exit lines of train.py ("finished" or "pre-empted")."""
    return {int(r): int(s) for r, s in re.findall(rf"qstar_ds: rank (\d+)/2 {what}.*? at step (\d+)", text)}


def wait_for_step(out_dir, step: int, cluster, jid: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while max(steps_logged(out_dir), default=0) < step:
        state = cluster.job(jid).get("JobState")
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), f"job {jid} {state} before step {step}"
        assert time.time() < deadline, f"job {jid} did not reach step {step}"
        time.sleep(0.2)


def metric_lines(out_dir) -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [json.loads(s) for s in f if s.strip()]


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory):
    """(a) slurm/owm_8node.sh itself, with command-line overrides, on 2 emulated nodes."""
    tmp = tmp_path_factory.mktemp("ref")
    t0 = time.time()
    jid, log = submit(cluster, tmp, "ref", tmp / "run")
    info = cluster.wait(jid, 600)
    text = read(log)
    assert info["JobState"] == "COMPLETED", f"{info.get('JobState')} {info.get('ExitCode')}\n{text[-4000:]}"
    print(f"\n[cluster] reference job: {time.time() - t0:.1f} s")
    return {"dir": tmp / "run", "log": text, "losses": steps_logged(tmp / "run"), "seconds": time.time() - t0}


def test_owm_script_on_two_emulated_nodes(reference):
    text = reference["log"]
    assert rank_lines(text, "finished") == {0: STEPS, 1: STEPS}, text[-3000:]   # every rank, not the job state
    assert "on 2 node(s)" in text and "preset debug_cpu" in text
    assert re.search(r"master 127\.0\.0\.1:\d+", text)
    assert sorted(reference["losses"]) == list(range(1, STEPS + 1))
    ckpts = sorted(p.name for p in (reference["dir"] / "checkpoints").iterdir() if p.name.startswith("step_"))
    assert ckpts == [f"step_{s:08d}" for s in (4, 8, 12)]
    assert all((reference["dir"] / "checkpoints" / c / "COMPLETE").exists() for c in ckpts)


def test_preemption_signal_requeues_and_resumes(cluster, reference, tmp_path):
    """(b) USR1 to the batch script (what --signal=B:USR1@300 sends before the time limit): the
    ranks save after the current step and exit, the job requeues itself, the same job id resumes."""
    t0 = time.time()
    out = tmp_path / "run"
    jid, log = submit(cluster, tmp_path, "pre", out)
    wait_for_step(out, 2, cluster, jid)
    cluster.run(["scancel", "--signal=USR1", "--batch", str(jid)])
    deadline = time.time() + 600
    while True:
        info = cluster.wait(jid, max(1, deadline - time.time()))
        if info.get("JobState") != "COMPLETED" or int(info.get("Restarts", 0)) >= 1:
            break
        time.sleep(0.5)
    text = read(log)
    assert info["JobState"] == "COMPLETED" and int(info["Restarts"]) == 1, f"{info}\n{text[-4000:]}"
    stopped = rank_lines(text, r"pre-empted \(SIGUSR1\)")
    assert len(stopped) == 2 and len(set(stopped.values())) == 1, text[-4000:]     # both ranks, same step
    stop = stopped[0]
    assert stop < STEPS and "requeueing job" in text and "(restart 1)" in text
    assert f"resumed from {out / 'checkpoints' / f'step_{stop:08d}'} (step {stop})" in read(out / "train.log")
    assert rank_lines(text, "finished") == {0: STEPS, 1: STEPS}
    lines = metric_lines(out)
    assert [d["step"] for d in lines] == list(range(1, STEPS + 1))        # no step lost, none counted twice
    assert lines[-1]["samples"] == 2 * STEPS
    for s in range(1, STEPS + 1):
        assert lines[s - 1]["loss"] == pytest.approx(reference["losses"][s], rel=1e-6, abs=1e-7), s
    print(f"\n[cluster] pre-emption + requeue: {time.time() - t0:.1f} s (stopped after step {stop})")


def test_kill9_then_resubmit_resumes_from_last_checkpoint(cluster, reference, tmp_path):
    """(c) SIGKILL to every process of the job, no warning; the same script submitted again
    resumes from the last periodic checkpoint and ends with the uninterrupted run's losses."""
    t0 = time.time()
    out = tmp_path / "run"
    # --no-requeue: otherwise SLURM requeues the killed job by itself (also fine, but here we
    # test the user's path: the job is gone, the same command is submitted again)
    jid, log = submit(cluster, tmp_path, "kill", out, ["--no-requeue"])
    wait_for_step(out, SAVE_EVERY + 1, cluster, jid)
    # SIGKILL every process of the run (srun and both ranks: their command lines name the output
    # dir), as the OOM killer or a dying node would: no handler runs, nothing is saved
    killed = subprocess.run(["pkill", "-KILL", "-f", str(out)], capture_output=True)
    assert killed.returncode == 0
    info = cluster.wait(jid, 120)
    killed_at = max(steps_logged(out))
    text = read(log)
    assert info["JobState"] == "FAILED" and killed_at < STEPS, (info, killed_at)
    assert "finished" not in text and "pre-empted" not in text
    saved = max(int(p.name[5:]) for p in (out / "checkpoints").iterdir() if (p / "COMPLETE").exists())
    assert saved % SAVE_EVERY == 0 and saved < killed_at              # the last periodic checkpoint
    jid2, log2 = submit(cluster, tmp_path, "kill", out)
    info = cluster.wait(jid2, 600)
    text = read(log2)
    assert info["JobState"] == "COMPLETED", f"{info}\n{text[-4000:]}"
    assert rank_lines(text, "finished") == {0: STEPS, 1: STEPS}
    assert f"(step {saved})" in read(out / "train.log")
    lines = metric_lines(out)
    resumed = [d for d in lines if d["step"] > saved][-(STEPS - saved):]
    assert [d["step"] for d in resumed] == list(range(saved + 1, STEPS + 1)) and resumed[-1]["samples"] == 2 * STEPS
    for d in resumed:
        assert d["loss"] == pytest.approx(reference["losses"][d["step"]], rel=1e-6, abs=1e-7), d["step"]
    print(f"\n[cluster] kill -9 + resubmit: {time.time() - t0:.1f} s (killed at step {killed_at}, resumed from {saved})")


def _need(binary: str) -> str:
    path = shutil.which(binary)
    if path is None:
        missing(ci(), f"{binary} not found")
    return path


def test_mpirun_two_ranks(tmp_path):
    """(d) mpirun -np 2 python qstar_ds/train.py: ranks found through mpi4py discovery."""
    mpirun = _need("mpirun")
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        missing(ci(), "mpi4py not installed")
    t0 = time.time()
    port = free_ports(1)[0]
    # Under Open MPI's environment DeepSpeed's JIT build of its CPU comm extension sees a different
    # command line and rebuilds it (~1 min), invalidating the copy the other tests use: own dir
    ext = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/torch_extensions")),
                       "under_mpirun")
    cmd = [mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR=cpu",
           "-x", f"TORCH_EXTENSIONS_DIR={ext}",
           "-x", f"MASTER_PORT={port}", "-x", "OMP_NUM_THREADS=1", "-x", "PYTHONWARNINGS=ignore",
           sys.executable, TRAIN, "--preset", "debug_cpu", "--max_steps", "2", "--output_dir", str(tmp_path / "run")]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert rank_lines(res.stdout, "finished") == {0: 2, 1: 2}, res.stdout[-3000:]
    print(f"\n[cluster] mpirun -np 2: {time.time() - t0:.1f} s")


def test_deepspeed_launcher_with_hostfile(tmp_path):
    """(e) deepspeed --hostfile (localhost slots=2); no sshd here: --no_ssh_check."""
    ds = _need("deepspeed")
    t0 = time.time()
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("localhost slots=2\n")
    port = free_ports(1)[0]
    cmd = [ds, "--hostfile", str(hostfile), "--no_ssh_check", "--master_addr", "127.0.0.1", "--master_port", str(port),
           TRAIN, "--preset", "debug_cpu", "--max_steps", "2", "--output_dir", str(tmp_path / "run")]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert rank_lines(res.stdout, "finished") == {0: 2, 1: 2}, res.stdout[-3000:]
    print(f"\n[cluster] deepspeed --hostfile: {time.time() - t0:.1f} s")
