"""Faults and bad inputs, tried as a user meets them. Every case ends in one of two ways: training
continues correctly (the same losses as a run that never met the fault), or one clear line on
stderr and exit code 2 before anything expensive. In no case is a good checkpoint deleted, and
no code planted in a checkpoint file runs. (Kills mid-step and mid-save, Ctrl-C and pre-emption
signals: tests/test_cli.py and tests/test_cluster.py.)"""
import hashlib
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from helpers import ROOT, launch

TRAIN = os.path.join(ROOT, "qstar_ds", "train.py")
EXPORT = os.path.join(ROOT, "tools", "export_hf.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
BASE = ["--preset", "debug_cpu", "--ds_config", os.path.join(ROOT, "ds_configs", "zero3.json"),
        "--train.save_every", "1", "--train.keep_last", "3", "--train.eval_every", "0"]
STEPS = 5     # the reference run: checkpoints of steps 3, 4 and 5 are kept


def run(args: list[str], out, timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py as one process (no launcher), so its own exit code comes back."""
    return subprocess.run([sys.executable, TRAIN] + BASE + ["--output_dir", str(out)] + args, env=ENV,
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def one_line_error(res: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit code 2, no traceback, exactly one error line, containing every needle."""
    errors = [ln for ln in res.stderr.splitlines() if ln.startswith(("qstar_ds: error:", "export_hf: error:"))]
    assert res.returncode == 2, (res.returncode, res.stderr[-3000:])
    assert "Traceback" not in res.stderr + res.stdout, res.stderr[-3000:]
    assert len(errors) == 1, res.stderr[-3000:]
    for n in needles:
        assert n in errors[0], (n, errors[0])
    return errors[0]


def losses(out) -> dict[int, float]:
    """{step: loss} from metrics.jsonl (a resumed run's rows for a step replace earlier ones)."""
    got = {}
    for line in open(os.path.join(out, "metrics.jsonl")):
        row = json.loads(line)
        got[row["step"]] = row
    return got


def ckpt(out, step: int):
    return out / "checkpoints" / f"step_{step:08d}"


def steps_present(out) -> list[int]:
    return sorted(int(p.name[5:]) for p in (out / "checkpoints").iterdir()
                  if p.name.startswith("step_") and (p / "COMPLETE").exists())


def files_of(path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def reforge_manifest(path) -> None:
    """Rewrite the meta's sizes and hashes to match the files as they are now: what someone
    who plants a file would also do (so only the content scan can catch it)."""
    meta = json.loads((path / "qstar_meta.json").read_text())
    for name in meta["files"]:
        data = (path / name).read_bytes()
        meta["files"][name] = [len(data), hashlib.sha256(data).hexdigest()]
    (path / "qstar_meta.json").write_text(json.dumps(meta))


class Payload:
    """Unpickling this creates a directory: harmless proof that code from a file ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def plant(file, marker: str) -> None:
    """Add a payload to a torch.save file, keeping everything else (we wrote it: trusted)."""
    state = torch.load(file, weights_only=False)
    if isinstance(state, dict):
        state["extra"] = Payload(marker)
    else:                                               # a bare tensor file (universal form)
        state = {"tensor": state, "extra": Payload(marker)}
    torch.save(state, file)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("faults") / "ref"
    res = run(["--max_steps", str(STEPS)], out)
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps_present(out) == [3, 4, 5]
    return out


@pytest.fixture
def copy(reference, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(reference, dst)
    for p in (dst / "checkpoints").iterdir():         # the meta records the template's absolute path
        if (p / "qstar_meta.json").exists():
            meta = json.loads((p / "qstar_meta.json").read_text())
            meta["template"] = str(dst / "hf_template")
            (p / "qstar_meta.json").write_text(json.dumps(meta))
    return dst


def truncate(path):
    f = next(p for p in sorted(path.iterdir()) if p.name.endswith("optim_states.pt"))
    f.write_bytes(f.read_bytes()[:1000])
    return "bytes,"


def remove(path):
    next(p for p in sorted(path.iterdir()) if p.name.endswith("model_states.pt")).unlink()
    return "is missing"


def bit_flip(path):
    f = next(p for p in sorted(path.iterdir()) if p.name.endswith("optim_states.pt"))
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x10
    f.write_bytes(bytes(data))
    return "is damaged (sha256"


def bad_meta_json(path):
    (path / "qstar_meta.json").write_text('{"step": 5, "samp')
    return "unreadable"


def incomplete_meta(path):
    meta = json.loads((path / "qstar_meta.json").read_text())
    del meta["data_state"]
    (path / "qstar_meta.json").write_text(json.dumps(meta))
    return "incomplete (no data_state)"


def rng_state_missing(path):
    (path / "rank_state_00000.json").unlink()
    return "rank_state_00000.json is missing"


@pytest.mark.parametrize("damage", [truncate, remove, bit_flip, bad_meta_json, incomplete_meta, rng_state_missing])
def test_damaged_newest_checkpoint_falls_back_and_continues_exactly(reference, copy, damage):
    newest = ckpt(copy, STEPS)
    why = damage(newest)
    damaged = files_of(newest)
    res = run(["--max_steps", str(STEPS)], copy)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert f"checkpoint {newest} skipped: " in out and why in out, out[-3000:]
    assert f"resumed from {ckpt(copy, STEPS - 1)} (step {STEPS - 1})" in out
    # the re-run step equals the reference run's, and the damaged checkpoint is kept aside, not deleted
    assert losses(copy)[STEPS]["loss"] == pytest.approx(losses(reference)[STEPS]["loss"], rel=1e-6)
    assert files_of(copy / "checkpoints" / "superseded" / f"step_{STEPS:08d}") == damaged
    assert steps_present(copy) == [3, 4, 5]


def test_no_checkpoint_verifies_or_named_one_is_damaged_refused(copy):
    for step in (3, 4, 5):
        truncate(ckpt(copy, step))
    before = {s: files_of(ckpt(copy, s)) for s in (3, 4, 5)}
    one_line_error(run(["--max_steps", str(STEPS + 1)], copy), "no checkpoint under", "verifies", "Nothing was deleted")
    one_line_error(run(["--max_steps", str(STEPS + 1), "--resume", str(ckpt(copy, 4))], copy),
                   f"cannot resume from {ckpt(copy, 4)}", "bytes")
    assert {s: files_of(ckpt(copy, s)) for s in (3, 4, 5)} == before


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_code_planted_in_a_deepspeed_file_never_runs(copy, tmp_path, kind):
    marker = str(tmp_path / "payload_ran")
    target = next(p for p in sorted(ckpt(copy, STEPS).iterdir()) if p.name.endswith(f"{kind}.pt"))
    plant(target, marker)
    reforge_manifest(ckpt(copy, STEPS))
    # resume auto: the planted checkpoint is skipped with its reason, the previous one is used
    res = run(["--max_steps", str(STEPS)], copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "holds pickled objects that are not tensor data (os.makedirs)" in res.stdout + res.stderr
    assert not os.path.exists(marker)
    # named exactly: refused; export/evaluate's loader (zero_to_fp32): refused
    planted = copy / "checkpoints" / "superseded" / f"step_{STEPS:08d}"
    one_line_error(run(["--max_steps", str(STEPS + 1), "--resume", str(planted)], copy), "os.makedirs")
    res = subprocess.run([sys.executable, EXPORT, str(planted), str(tmp_path / "hf")], env=ENV,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    one_line_error(res, "os.makedirs")
    assert not os.path.exists(marker)
    # the control: the same file unpickled the unsafe way does run the payload (the test can fail)
    torch.load(planted / target.name, weights_only=False)
    assert os.path.exists(marker)


def test_code_planted_in_rank_state_and_loader_bypass_is_refused(copy, tmp_path):
    """Older checkpoints kept RNG states in rank_state_*.pt; a planted one is found by the scan, and
    torch.load itself refuses it inside safe_load's context even when a caller asks for pickle."""
    from qstar_ds import checkpoint as ck
    from qstar_ds.safe_load import UnsafeCheckpoint, safe_torch_load, weights_only_loading
    marker = str(tmp_path / "payload_ran")
    path = ckpt(copy, STEPS)
    (path / "rank_state_00000.json").unlink()
    torch.save({"python": [3, [0] * 625, None], "x": Payload(marker)}, path / "rank_state_00000.pt")
    reforge_manifest_with = json.loads((path / "qstar_meta.json").read_text())
    del reforge_manifest_with["files"]["rank_state_00000.json"]
    reforge_manifest_with["files"]["rank_state_00000.pt"] = [0, ""]
    (path / "qstar_meta.json").write_text(json.dumps(reforge_manifest_with))
    reforge_manifest(path)
    assert "rank_state_00000.pt holds pickled objects that are not tensor data (os.makedirs)" in ck.verify(str(path))
    with pytest.raises(UnsafeCheckpoint, match="rank_state_00000.pt: refusing to load it.*os.makedirs"):
        safe_torch_load(str(path / "rank_state_00000.pt"))
    with weights_only_loading(), pytest.raises(UnsafeCheckpoint):
        torch.load(str(path / "rank_state_00000.pt"), weights_only=False)   # what DeepSpeed's code asks for
    assert not os.path.exists(marker)


def test_resume_none_over_existing_checkpoints_is_refused(copy):
    before = {s: files_of(ckpt(copy, s)) for s in (3, 4, 5)}
    one_line_error(run(["--max_steps", "2", "--resume", "none"], copy), "train.resume=none", "step 5",
                   "nothing was deleted")
    assert {s: files_of(ckpt(copy, s)) for s in (3, 4, 5)} == before


def test_branching_back_keeps_the_left_branch_and_auto_follows_the_new_one(reference, copy):
    left = {s: files_of(ckpt(copy, s)) for s in (4, 5)}
    res = run(["--max_steps", str(STEPS), "--resume", str(ckpt(copy, 3)), "--optim.lr", "0.002",
               "--thought.positions", "5", "--thought.beta", "2"], copy)
    assert res.returncode == 0, res.stderr[-3000:]
    out = res.stdout + res.stderr
    assert "belong to the branch left behind; moved to" in out
    # the optimizer setting changed on resume is applied (said once) and recorded: lr doubles
    assert "optim.lr 0.001 -> 0.002" in out and "thought.positions 0 -> 5" in out
    # every other changed setting is said too, once, and the optimizer's are not said twice
    other = [ln for ln in out.splitlines() if "resuming with other settings than the checkpoint's" in ln]
    assert len(other) == 1 and "in effect from step 3 on" in other[0], out[-3000:]
    assert "thought.beta 1.0 -> 2.0" in other[0] and f"train.output_dir '{reference}' -> '{copy}'" in other[0]
    assert "optim.lr" not in other[0] and "thought.positions" not in other[0] and "train.resume" not in other[0]
    for s in (4, 5):
        assert losses(copy)[s]["lr"] == pytest.approx(2 * losses(reference)[s]["lr"], rel=1e-9)
        assert files_of(copy / "checkpoints" / "superseded" / f"step_{s:08d}") == left[s]
    assert json.loads((ckpt(copy, STEPS) / "qstar_meta.json").read_text())["parent"] == str(ckpt(copy, 3))
    # a requeue (--resume auto) continues the new branch, not the one left behind
    res = run(["--max_steps", str(STEPS + 1)], copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resumed from {ckpt(copy, STEPS)} (step {STEPS})" in res.stdout + res.stderr
    assert json.loads((ckpt(copy, STEPS + 1) / "qstar_meta.json").read_text())["parent"] == str(ckpt(copy, STEPS))
    assert all((copy / "checkpoints" / "superseded" / f"step_{s:08d}" / "COMPLETE").exists() for s in (4, 5))


def test_rotation_deletes_only_this_runs_checkpoints_and_trash(copy):
    foreign = ckpt(copy, 1)
    shutil.copytree(ckpt(copy, 3), foreign)           # another run's checkpoint, copied in
    meta = json.loads((foreign / "qstar_meta.json").read_text())
    meta.update(run_id="someone-else", step=1)
    (foreign / "qstar_meta.json").write_text(json.dumps(meta))
    trash = copy / "checkpoints" / ".trash-step_00000002-1-1"   # a deletion killed half way
    trash.mkdir()
    res = run(["--max_steps", "7", "--train.keep_last", "1"], copy)
    assert res.returncode == 0, res.stderr[-3000:]
    assert steps_present(copy) == [1, 7]
    assert not trash.exists()


def test_resume_on_another_number_of_ranks_continues_the_same_run(reference, copy, tmp_path):
    """Pre-emptible clusters hand out different allocations: a checkpoint of 1 rank resumes on 2
    through DeepSpeed's universal form (made once, inside the checkpoint) with the losses of the
    run that stayed on 1 rank."""
    same = tmp_path / "same"
    shutil.copytree(copy, same)
    res = launch([TRAIN] + BASE + ["--output_dir", str(copy), "--max_steps", str(STEPS + 2)], nproc=2)
    assert "was written by 1 rank(s), now 2: loading its universal form" in res.stdout + res.stderr
    assert (ckpt(copy, STEPS) / "universal" / "COMPLETE").exists()
    alone = run(["--max_steps", str(STEPS + 2)], same)
    assert alone.returncode == 0, alone.stderr[-3000:]
    for s in (STEPS + 1, STEPS + 2):
        assert losses(copy)[s]["loss"] == pytest.approx(losses(same)[s]["loss"], rel=1e-4)
    # and back: the 2-rank checkpoint resumes on 1
    res = run(["--max_steps", str(STEPS + 3)], copy)
    assert res.returncode == 0 and "written by 2 rank(s), now 1" in res.stdout + res.stderr, res.stderr[-3000:]
    # the universal form (here of the 2-rank step) is a checkpoint file kind too: planted code never runs
    marker = str(tmp_path / "payload_ran")
    newer = files_of(ckpt(copy, STEPS + 3))
    for name in ("optimizer_state.pt", "base.model.norm.weight/fp32.pt"):
        target = ckpt(copy, STEPS + 2) / "universal" / "zero" / name
        clean = target.read_bytes()
        plant(target, marker)
        res = run(["--max_steps", str(STEPS + 4), "--resume", str(ckpt(copy, STEPS + 2))], copy)
        one_line_error(res, f"{os.path.basename(name)}: refusing to load it", "os.makedirs")
        assert not os.path.exists(marker)
        target.write_bytes(clean)
    assert files_of(ckpt(copy, STEPS + 3)) == newer        # a resume that failed left the newer checkpoint alone


@pytest.mark.parametrize("ds", ["zero2", "zero3_offload"])
def test_every_shipped_ds_config_resumes_and_reshards(tmp_path, ds):
    """ZeRO-1/2 optimizer files hold other DeepSpeed classes than ZeRO-3's: each shipped config
    resumes (same ranks) and reshards (2 ranks -> 1) through the safe loader."""
    common = ["--preset", "debug_cpu", "--ds_config", os.path.join(ROOT, "ds_configs", f"{ds}.json"),
              "--train.save_every", "1", "--train.eval_every", "0"]
    a, b = tmp_path / "a", tmp_path / "b"
    launch([TRAIN] + common + ["--output_dir", str(a), "--max_steps", "2"], nproc=2)
    shutil.copytree(a, b)
    launch([TRAIN] + common + ["--output_dir", str(a), "--max_steps", "3"], nproc=2)
    res = subprocess.run([sys.executable, TRAIN] + common + ["--output_dir", str(b), "--max_steps", "3"], env=ENV,
                         capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0 and "now 1: loading its universal form" in res.stdout, res.stderr[-3000:]
    assert losses(b)[3]["loss"] == pytest.approx(losses(a)[3]["loss"], rel=1e-4)


def test_diverging_run_skips_bad_steps_then_stops_without_saving_them(tmp_path):
    out = tmp_path / "nan"
    res = run(["--max_steps", "6", "--optim.lr", "1e30", "--optim.warmup_steps", "0", "--train.max_bad_steps", "1"], out)
    one_line_error(res, "2 steps in a row with a non-finite loss", "stopped without saving",
                   f"the newest checkpoint is {ckpt(out, 1)}")
    assert (res.stdout + res.stderr).count("update skipped") == 2
    assert steps_present(out) == [1]


@pytest.mark.parametrize("content,needle", [
    (b'{"text": "ok"}\n{"text": 5}\n', "line 2: field data.text_field='text' is int"),
    (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', "line 2: not UTF-8 text (byte 0xe9"),
    (b'{"text": "ok"}\n{"text": "ok",\n', "line 2: not valid JSON"),
    (b'["a list"]\n', "line 1: a JSON list, not an object"),
    (b'{"body": "no text field"}\n', "field data.text_field='text' is missing"),
    (b"\x00\x01\x02binary", "line 1: binary data"),
    (b"", "the file is empty"),
])
def test_bad_data_file_is_one_line_before_the_model_loads(tmp_path, content, needle):
    bad = tmp_path / "data.jsonl"
    bad.write_bytes(content)
    res = run(["--data.source", str(bad), "--max_steps", "1"], tmp_path / "out")
    one_line_error(res, f"data.source='{bad}'", needle)
    assert not (tmp_path / "out" / "hf_template").exists()       # refused before the model was built
    res = run(["--eval.source", str(bad), "--max_steps", "1"], tmp_path / "out2")
    one_line_error(res, f"eval.source='{bad}'")


def test_bad_output_dir_is_one_line(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    one_line_error(run(["--max_steps", "1"], f), "exists and is not a directory")
    one_line_error(run(["--max_steps", "1"], f / "sub"), "not writable")


FULL_DISK_SAVE = """
import json, os, resource, signal, sys, torch
from qstar_ds import checkpoint as ckpt
out, step = sys.argv[1], int(sys.argv[2])

class Engine:                          # writes what DeepSpeed writes for one rank: torch.save files
    module = torch.nn.Linear(512, 512)
    def save_checkpoint(self, ckpt_dir, tag, client_state, save_latest):
        os.makedirs(os.path.join(ckpt_dir, tag), exist_ok=True)
        torch.save(self.module.state_dict(), os.path.join(ckpt_dir, tag, "mp_rank_00_model_states.pt"))

signal.signal(signal.SIGXFSZ, signal.SIG_IGN)     # a write past the limit fails like a full disk
resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))
try:
    ckpt.save(Engine(), out, step, {"step": step}, keep_last=2)
except ckpt.CheckpointError as e:
    print("ERROR", e)
"""


def test_failed_checkpoint_write_is_one_line_and_keeps_the_last_complete_one(copy, tmp_path):
    """The write of a checkpoint fails (a full disk, a quota, a file-size limit): one line naming
    the directory and the cause; the complete checkpoints stay as they were and --resume auto still
    picks the newest."""
    before = {p: p.stat().st_size for p in ckpt(copy, STEPS).iterdir()}
    res = subprocess.run([sys.executable, "-c", FULL_DISK_SAVE, str(copy), str(STEPS + 1)], env=ENV,
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("ERROR")]
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stdout + res.stderr[-2000:]
    assert f"checkpoint step {STEPS + 1}: writing {ckpt(copy, STEPS + 1)} failed" in lines[0], lines[0]
    assert f"the newest complete checkpoint is {ckpt(copy, STEPS)}" in lines[0], lines[0]
    assert {p: p.stat().st_size for p in ckpt(copy, STEPS).iterdir()} == before
    assert steps_present(copy) == [3, 4, 5]
    assert not (ckpt(copy, STEPS + 1) / "COMPLETE").exists()


def test_checkpoint_that_cannot_fit_is_refused_before_writing(copy):
    from qstar_ds import checkpoint as ck
    ckpt_dir = str(copy / "checkpoints")
    share = ck.bytes_to_write(ckpt_dir, n_params=1, world=1)     # the newest checkpoint's size, not 16 bytes
    assert share == sum(p.stat().st_size for p in ckpt(copy, STEPS).iterdir() if p.name not in ("COMPLETE", ck.META))
    assert ck.bytes_to_write(str(copy / "none"), n_params=1000, world=4) == 4000
    ck.check_space(ckpt_dir, share, STEPS + 1)                   # fits: no error
    free = shutil.disk_usage(ckpt_dir).free
    with pytest.raises(ck.CheckpointError) as e:
        ck.check_space(ckpt_dir, free, STEPS + 1)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"checkpoint step {STEPS + 1}: about ") and "free there" in msg, msg
    assert f"the newest complete checkpoint is {ckpt(copy, STEPS)}" in msg, msg
    assert not ckpt(copy, STEPS + 1).exists() and steps_present(copy) == [3, 4, 5]


def test_sigterm_to_the_deepspeed_runner_alone_stops_its_ranks_with_a_checkpoint(tmp_path):
    """The runner exits on SIGTERM without passing it on; its launcher and ranks used to train on
    unattended. Now the ranks notice their launcher is gone, save after the step and exit."""
    import time

    import psutil
    out = tmp_path / "orphan"
    cmd = ["deepspeed", TRAIN] + BASE + ["--output_dir", str(out), "--max_steps", "100000",
                                         "--train.save_every", "0"]
    proc = subprocess.Popen(cmd, env=ENV, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    below = []
    try:
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or len((out / "metrics.jsonl").read_text().splitlines()) < 2:
            assert proc.poll() is None and time.time() < deadline, "training did not start"
            time.sleep(0.2)
        below = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()                                          # the runner only
        proc.wait(timeout=60)
        gone, alive = psutil.wait_procs(below, timeout=120)
        assert not alive, [" ".join(p.cmdline()[:4]) for p in alive]
    finally:                                      # whatever happened, leave nothing running
        for p in below + ([psutil.Process(proc.pid)] if proc.poll() is None else []):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    log = (out / "train.log").read_text()
    assert "pre-empted by the loss of its launcher" in log, log[-2000:]
    last = max(losses(out))
    assert steps_present(out) == [last]                            # saved at the step it stopped after
