"""train.py as users run it: bad input gives one clear line, SIGKILL + --resume auto continues
with the same losses, checkpoints that were being written are never resumed from, resumes that
change the model are refused, export to a HF directory round-trips."""
import json
import re
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from helpers import ROOT, SGD_JSON, assert_equal, free_port, launch

TRAIN = os.path.join(ROOT, "qstar_ds", "train.py")
ENV = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")


def run_single(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    """train.py as one process, no launcher."""
    return subprocess.run([sys.executable, TRAIN] + args, env=ENV, capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a launcher and every process under it (torchrun starts its workers in their own
    sessions, so killing its process group alone would leave them running)."""
    import psutil
    procs = [psutil.Process(proc.pid)] + psutil.Process(proc.pid).children(recursive=True)
    for p in procs:
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait()
    psutil.wait_procs(procs, timeout=30)


def steps_logged(out_dir) -> dict[int, float]:
    """{step: loss} from metrics.jsonl (the last line of a step wins: a resumed run rewrites it)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return {}
    out = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                d = json.loads(line)
                out[d["step"]] = d["loss"]
    return out


@pytest.mark.parametrize("args,expected", [
    (["--thought.thought_len", "0"], "thought.thought_len=0: must be an integer >= 1"),
    (["--thought.talk_len", "0"], "thought.talk_len=0: must be an integer >= 1"),
    (["--data.seq_len", "3", "--thought.talk_len", "3"], "data.seq_len=3: is shorter than thought.talk_len + 1 = 4"),
    (["--thought.positions", "23"], "thought.positions=23: is more than the 22 positions of a sequence of data.seq_len=24"),
    (["--thought.positions", "-1"], "thought.positions=-1: must be an integer >= 0"),
    (["--thought.positions", "5", "--thought.position_focus", "(1"], "thought.position_focus='(1': is not a regular expression"),
    (["--thought.position_focus", "\\d"], "thought.position_focus='\\\\d': needs thought.positions > 0"),
    (["--eval.focus", "(1"], "eval.focus='(1': is not a regular expression"),
    (["--thought.oracle_focus", "\\d"], "thought.oracle_focus='\\\\d': is used only with thought.mode=oracle"),
    (["--thought.mode", "filler", "--thought.reinforce_focus", "="], "thought.reinforce_focus='=': is used only with thought.mode=quiet_star or teacher"),
    (["--thought.mode", "oracle", "--thought.oracle_focus", "(1"], "thought.oracle_focus='(1': is not a regular expression"),
    (["--thought.mode", "teacher"], "thought.thought_len=2: thought.mode=teacher writes steps such as '9+9=18'"),
    (["--train.max_steps", "ten"], "train.max_steps='ten': expected an integer"),
    (["--thought.beta", "big"], "thought.beta='big': expected a number"),
    (["--model.thought_init", ""], "model.thought_init='': must not be empty"),
    (["--model.thought_init_file", "markers.pt"], "model.thought_init_file='markers.pt': must be a .safetensors file"),
    (["--model.thought_init_file", "missing.safetensors"], "model.thought_init_file='missing.safetensors': no such file"),
    (["--thought.talk_positions", "before"], "thought.talk_positions='before': must be one of ['after_thought', 'resume']"),
    (["--no.such_key", "1"], "unknown config key 'no.such_key'"),
    (["--preset", "gpt5"], "preset='gpt5': unknown"),
    (["--ds_config", "missing.json"], "ds_config='missing.json': no such file"),
    (["--config", "missing.yaml"], "config='missing.yaml'"),
    (["--data.source", "/nonexistent/corpus.jsonl"], "data.source='/nonexistent/corpus.jsonl': no such file"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expected):
    res = run_single(["--preset", "debug_cpu", "--output_dir", str(tmp_path)] + args)
    assert res.returncode == 2, res.stderr[-2000:]
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("qstar_ds: error: ") and expected in last, last


def test_ds_json_batch_fields_that_contradict_are_refused(tmp_path):
    ds = dict(SGD_JSON, gradient_accumulation_steps=3)
    (tmp_path / "ds.json").write_text(json.dumps(ds))
    res = run_single(["--preset", "debug_cpu", "--ds_config", str(tmp_path / "ds.json"),
                      "--output_dir", str(tmp_path / "out")])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert "gradient_accumulation_steps=3 contradicts train.batch_size=2" in last, last


def test_sigkill_then_resume_auto_gives_the_same_losses(tmp_path):
    common = ["--preset", "debug_cpu", "--ds_config", "ds_configs/zero3.json", "--max_steps", "30",
              "--train.save_every", "4", "--train.keep_last", "2"]
    ref_dir, run_dir = tmp_path / "ref", tmp_path / "run"
    launch([TRAIN] + common + ["--output_dir", str(ref_dir)], nproc=2)
    ref = steps_logged(ref_dir)
    assert sorted(ref) == list(range(1, 31))

    # the same run, killed with SIGKILL (launcher and both ranks) once step 10 is logged
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           TRAIN] + common + ["--output_dir", str(run_dir)]
    proc = subprocess.Popen(cmd, env=dict(ENV, PYTHONWARNINGS="ignore"), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while max(steps_logged(run_dir), default=0) < 10:
        assert proc.poll() is None, "training ended before it could be killed"
        assert time.time() < deadline, "training did not reach step 10"
        time.sleep(0.05)
    kill_tree(proc)
    killed_at = max(steps_logged(run_dir))
    assert killed_at < 30, "the kill came too late to test anything"
    ckpts = sorted(os.listdir(run_dir / "checkpoints"))
    complete = [c for c in ckpts if (run_dir / "checkpoints" / c / "COMPLETE").exists()]
    assert complete, ckpts
    resume_step = int(complete[-1].split("_")[1])
    # a save that was cut short (here: a newer step folder without COMPLETE) must be ignored
    partial = run_dir / "checkpoints" / f"step_{resume_step + 1:08d}"
    partial.mkdir(exist_ok=True)
    (partial / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"truncated")

    res = launch([TRAIN] + common + ["--output_dir", str(run_dir), "--resume", "auto"], nproc=2)
    assert f"resumed from {run_dir / 'checkpoints' / complete[-1]} (step {resume_step})" in res.stdout + res.stderr
    got = steps_logged(run_dir)
    assert sorted(got) == list(range(1, 31))
    for step in range(resume_step + 1, 31):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got[step], ref[step])
    assert not partial.exists(), "the interrupted save should be cleaned up by the next good one"
    assert len([c for c in os.listdir(run_dir / "checkpoints") if c.startswith("step_")]) == 2  # keep_last

    # pre-emption: SIGUSR1 to rank 1 only -> both ranks stop after the same step, save it, exit 0
    import psutil
    pre_dir = tmp_path / "pre"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           TRAIN] + common + ["--output_dir", str(pre_dir)]
    proc = subprocess.Popen(cmd, env=dict(ENV, PYTHONWARNINGS="ignore"), cwd=ROOT, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 300
    while max(steps_logged(pre_dir), default=0) < 6:
        assert proc.poll() is None and time.time() < deadline, "training ended or stalled before step 6"
        time.sleep(0.05)
    rank1 = [c for c in psutil.Process(proc.pid).children(recursive=True) if c.environ().get("RANK") == "1"]
    assert len(rank1) == 1
    rank1[0].send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    stops = {int(m) for m in re.findall(r"rank [01]/2 pre-empted \(.*?\) at step (\d+)", out)}
    assert len(re.findall(r"rank [01]/2 pre-empted", out)) == 2 and len(stops) == 1, out[-3000:]
    stop = stops.pop()
    assert stop < 30 and (pre_dir / "checkpoints" / f"step_{stop:08d}" / "COMPLETE").exists()
    assert max(steps_logged(pre_dir)) == stop
    res = launch([TRAIN] + common + ["--output_dir", str(pre_dir)], nproc=2)
    assert f"(step {stop})" in res.stdout + res.stderr and "rank 1/2 finished at step 30, samples 60" in res.stdout
    got = steps_logged(pre_dir)
    assert sorted(got) == list(range(1, 31))
    for step in range(stop + 1, 31):
        assert got[step] == pytest.approx(ref[step], rel=1e-6, abs=1e-7), (step, got[step], ref[step])


def test_a_probability_mixing_checkpoint_loads_and_exports_with_its_rule(tmp_path):
    """model.mix_rule=prob is part of the model: evaluation's loader and the export read it back
    from the checkpoint, and the exported directory mixes the same way."""
    from qstar_ds.loading import load_model
    from qstar_ds.model import QuietStarModel
    out = tmp_path / "out"
    res = run_single(["--preset", "debug_cpu", "--output_dir", str(out), "--max_steps", "1",
                      "--train.save_every", "1", "--model.mix_rule", "prob", "--model.mix_init", "0.2"])
    assert res.returncode == 0, res.stderr[-3000:]
    loaded = load_model(str(out))
    assert loaded.model.mix_spec == "prob:0.2"
    exp = tmp_path / "hf"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), str(out), str(exp)],
                         env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert QuietStarModel.from_pretrained(str(exp)).mix_spec == "prob:0.2"


def test_resume_refuses_changed_thoughts_then_export_round_trips(tmp_path):
    out = tmp_path / "out"
    base = ["--preset", "debug_cpu", "--output_dir", str(out), "--max_steps", "2", "--train.save_every", "2",
            "--thought.talk_positions", "resume"]
    res = run_single(base)
    assert res.returncode == 0, res.stderr[-3000:]

    res = run_single(base + ["--max_steps", "3", "--thought.thought_len", "3"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "thought_len: 2 -> 3" in res.stderr.strip().splitlines()[-1]
    res = run_single(base + ["--max_steps", "3", "--model.mix_rule", "prob"])
    assert res.returncode == 2 and "Traceback" not in res.stderr
    assert "mix: 'hidden' -> 'prob:0.01'" in res.stderr.strip().splitlines()[-1]
    # (a different number of ranks resumes through the universal form: tests/test_faults.py)

    # export: the HF directory loads without DeepSpeed and holds the trained values
    from qstar_ds.model import QuietStarModel, load_tokenizer
    exp = tmp_path / "hf"
    res = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "export_hf.py"), str(out), str(exp)],
                         env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    model = QuietStarModel.from_pretrained(str(exp))
    tok = load_tokenizer(str(exp))
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    state = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"), tag="step_00000002")
    for name, p in model.named_parameters():
        want = state[name].clone()
        if name == "base.model.embed_tokens.weight":   # save writes the learned marker vectors there
            want[[model.sot_id, model.eot_id]] = state["thought_embedding.weight"]
        assert_equal(p, want, name)
    assert torch.count_nonzero(model.mixing_head.net[-1].weight) > 0   # trained, not re-initialised
    assert tok.convert_tokens_to_ids("<|startofthought|>") == model.sot_id

    # evaluation straight from the DeepSpeed checkpoint (shards merged in memory) == from the export
    from conftest import shared_file
    gsm = shared_file("gsm8k/test_tiny.jsonl")
    results = []
    for src in (out, exp):
        dst = tmp_path / f"eval_{src.name}.json"
        res = subprocess.run([sys.executable, "-m", "qstar_ds.evaluate", "--model", str(src), "--tasks", "gsm8k",
                              "--data", f"gsm8k={gsm}", "--limit", "3", "--max_answer_tokens", "3",
                              "--output", str(dst)], env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
        assert res.returncode == 0, res.stderr[-3000:]
        results.append(json.loads(dst.read_text()))
    assert "DeepSpeed checkpoint" in results[0]["model"] and "step 2" in results[0]["model"]
    assert results[0]["thought_config"]["thought_len"] == results[1]["thought_config"]["thought_len"] == 2
    # the trained talk positions travel with the checkpoint and the export
    assert results[0]["thought_config"]["talk_positions"] == results[1]["thought_config"]["talk_positions"] == "resume"
    assert results[0]["items"] == results[1]["items"]


def test_logging_text_jsonl_thought_table_and_wandb_offline(tmp_path):
    out = tmp_path / "out"
    res = run_single(["--preset", "debug_cpu", "--output_dir", str(out), "--max_steps", "2",
                      "--train.thought_table_every", "1", "--train.wandb", "offline"])
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]
    assert [d["step"] for d in lines] == [1, 2]
    for key in ("loss", "loss_talk", "loss_base", "loss_reinforce", "reward_mean", "reward_pos_frac",
                "mix_w_mean", "grad_norm", "lr", "tokens_per_s"):
        assert key in lines[-1], key
    log = (out / "train.log").read_text()
    assert "thought step=1" in log and "thought step=2" in log
    assert list((out / "wandb").glob("offline-run-*")), "wandb offline run folder missing"
    assert "train: 100%" in res.stderr                              # the progress bar
    assert (out / "config.yaml").read_text().startswith("model:")   # resolved config stored


@pytest.mark.slow
def test_default_command_trains_smollm2(tmp_path):
    """`deepspeed qstar_ds/train.py --ds_config ds_configs/zero3.json`, as in the README (plus a
    step limit, an output folder and a held-out evaluation of 4 sequences instead of 32: the same
    code in less CI time), on the real SmolLM2-135M."""
    cmd = ["deepspeed", TRAIN, "--ds_config", "ds_configs/zero3.json", "--max_steps", "2",
           "--output_dir", str(tmp_path / "out"), "--eval.sequences", "4"]
    res = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=1200, cwd=ROOT)
    assert res.returncode == 0, (res.stdout[-3000:], res.stderr[-3000:])
    assert "model smollm2" in res.stdout and "ZeRO stage 3" in res.stdout
    assert "qstar_ds: result (quiet_star, 2 steps): held-out NLL" in res.stdout   # the last lines: the result
    assert sorted(steps_logged(tmp_path / "out")) == [1, 2]
    assert (tmp_path / "out" / "checkpoints" / "step_00000002" / "COMPLETE").exists()


def test_every_shipped_ds_config_trains(tmp_path):
    first = {}
    for ds in ("zero2", "zero3", "zero3_offload"):
        out = tmp_path / ds
        res = run_single(["--preset", "debug_cpu", "--ds_config", f"ds_configs/{ds}.json",
                          "--output_dir", str(out), "--max_steps", "2", "--train.save_every", "0"])
        assert res.returncode == 0, res.stderr[-3000:]
        assert f"ZeRO stage {2 if ds == 'zero2' else 3}" in res.stdout
        losses = steps_logged(out)
        assert sorted(losses) == [1, 2] and losses[2] != losses[1]
        first[ds] = losses[1]
    # step 1 is computed before any update: the same model and data under every config
    assert first["zero2"] == pytest.approx(first["zero3"], rel=1e-6)
    assert first["zero3_offload"] == pytest.approx(first["zero3"], rel=1e-6)


def test_yaml_config_merges_between_preset_and_command_line(tmp_path):
    from qstar_ds.cli import parse_args
    y = tmp_path / "run.yaml"
    y.write_text("thought:\n  thought_len: 5\n  talk_len: 3\ntrain:\n  max_steps: 9\n")
    cfg, _ = parse_args(["--preset", "debug_cpu", "--config", str(y), "--train.max_steps", "11"])
    assert (cfg.thought.thought_len, cfg.thought.talk_len, cfg.train.max_steps) == (5, 3, 11)
    assert cfg.model.name == "tiny-llama"                    # from the preset
    y.write_text("thought:\n  thoughtlen: 5\n")
    from qstar_ds.config import ConfigError
    with pytest.raises(ConfigError, match="unknown config key 'thought.thoughtlen'"):
        parse_args(["--preset", "debug_cpu", "--config", str(y)])


def test_config_changes_name_every_setting_that_differs_from_a_saved_config():
    import dataclasses
    from qstar_ds.cli import parse_args
    from qstar_ds.config import changes
    saved, _ = parse_args(["--preset", "debug_cpu", "--optim.betas", "0.8,0.99"])
    saved = json.loads(json.dumps(dataclasses.asdict(saved)))          # as a checkpoint's meta holds it
    cfg, _ = parse_args(["--preset", "debug_cpu", "--thought.mode", "filler", "--thought.beta", "3",
                         "--train.output_dir", "elsewhere", "--ds_config", "ds_configs/zero2.json"])
    assert changes(saved, cfg) == ["thought.mode 'quiet_star' -> 'filler'", "thought.beta 1.0 -> 3.0",
                                   "optim.betas [0.8, 0.99] -> [0.9, 0.999]",
                                   "train.output_dir 'out/qstar' -> 'elsewhere'",
                                   "ds_config 'ds_configs/zero3.json' -> 'ds_configs/zero2.json'"]
    assert changes(saved, cfg, skip={"optim.betas", "ds_config"}) == changes(saved, cfg)[:2] + [changes(saved, cfg)[3]]
    del saved["thought"]["beta"]                                      # written before the key existed
    assert "thought.beta 1.0 -> 3.0" not in changes(saved, cfg)
    same, _ = parse_args(["--preset", "debug_cpu", "--optim.betas", "0.8,0.99"])
    assert changes(saved, same) == []


def test_local_model_directory_and_local_jsonl_corpus(tmp_path):
    """--model.name accepts a local HF directory; --data.source a local jsonl file (the shared
    OpenWebMath-like sample), cropped and padded to n."""
    from test_data import shared_file
    from qstar_ds.tiny import tiny_causal_lm, tiny_tokenizer
    corpus = shared_file("owm_sample/text_tiny.jsonl")
    tok = tiny_tokenizer()
    tiny_causal_lm("qwen2", len(tok), hidden=64, intermediate=128).save_pretrained(tmp_path / "hf")
    tok.save_pretrained(tmp_path / "hf")
    out = tmp_path / "out"
    res = run_single(["--preset", "debug_cpu", "--model.name", str(tmp_path / "hf"), "--data.source", corpus,
                      "--data.pack", "false", "--data.seq_len", "48", "--output_dir", str(out),
                      "--max_steps", "2", "--train.chunk_tokens", "200"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"model {tmp_path / 'hf'}" in res.stdout
    meta = json.loads((out / "checkpoints" / "step_00000002" / "qstar_meta.json").read_text())
    # 2 steps x 2 sequences = 4 training documents; the held-out split's documents among them are skipped
    from qstar_ds.config import EvalConfig
    from qstar_ds.data import is_heldout
    with open(corpus) as f:
        sides = [is_heldout(json.loads(line)["text"], EvalConfig().holdout_fraction, 0) for line in f]
    read = [i for i, h in enumerate(sides) if not h][3] + 1
    assert read > 4, "the first documents must include a held-out one, or this does not test skipping"
    assert meta["data_state"]["doc_index"] == read and meta["data_state"]["source"] == corpus
    assert meta["signature"]["model_type"] == "qwen2"


def test_auto_attention_backend_is_resolved_and_logged(tmp_path):
    res = run_single(["--preset", "debug_cpu", "--output_dir", str(tmp_path / "o"), "--max_steps", "1",
                      "--thought.attention_backend", "auto"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attention backend split (auto on cpu" in res.stdout + res.stderr


def test_ctrl_c_once_saves_and_stops_twice_stops_at_once(tmp_path):
    """The first SIGINT (Ctrl-C) finishes the step, saves it and exits 0 with one line; a resume
    continues from it. Two SIGINTs stop at once: one line, exit 130, no traceback."""
    def start(out):
        return subprocess.Popen([sys.executable, TRAIN, "--preset", "debug_cpu", "--output_dir", str(out),
                                 "--max_steps", "500", "--train.save_every", "0"], env=ENV, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def wait_for_step(out, proc, step=2):
        deadline = time.time() + 240
        while max(steps_logged(out), default=0) < step:
            assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)

    out = tmp_path / "once"
    proc = start(out)
    wait_for_step(out, proc)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 0, stderr[-3000:]
    assert "Traceback" not in stderr and "Ctrl-C: stopping after this step and saving it" in stderr
    step = max(steps_logged(out))
    assert f"rank 0/1 pre-empted (SIGINT) at step {step}" in stdout
    assert (out / "checkpoints" / f"step_{step:08d}" / "COMPLETE").exists()
    res = run_single(["--preset", "debug_cpu", "--output_dir", str(out), "--max_steps", str(step + 1)])
    assert res.returncode == 0 and f"(step {step})" in res.stdout

    out = tmp_path / "twice"
    proc = start(out)
    wait_for_step(out, proc)
    proc.send_signal(signal.SIGINT)
    time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1].startswith("qstar_ds: interrupted: stopped at once without saving")


@pytest.mark.parametrize("where", ["bare", "inside a library's context manager", "raised from another error",
                                   "another error"])
def test_second_ctrl_c_inside_a_failing_context_manager_is_still_exit_130(tmp_path, monkeypatch, capsys, where):
    """The second Ctrl-C's KeyboardInterrupt can land inside DeepSpeed's GatheredParameters, whose
    exit then raises its own RuntimeError ('Cannot free a ZeRO-3 parameter while it is still
    active'): still one line and exit 130. An error with no Ctrl-C behind it is not swallowed."""
    import contextlib
    from qstar_ds import train, trainer as trainer_module

    @contextlib.contextmanager
    def gathered():                          # what GatheredParameters.__exit__ does mid-forward
        try:
            yield
        finally:
            raise RuntimeError("Cannot free a ZeRO-3 parameter while it is still active in submodules")

    class FakeTrainer:
        def __init__(self, cfg):
            pass

        def fit(self):
            if where == "bare":
                raise KeyboardInterrupt
            if where == "another error":
                raise ValueError("a real bug")
            if where == "raised from another error":      # `raise X from Y` while the interrupt unwinds
                try:
                    raise KeyboardInterrupt
                except KeyboardInterrupt:
                    raise RuntimeError("cleanup failed") from OSError("closing a file")
            with gathered():
                raise KeyboardInterrupt

        def close(self):
            pass

    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    argv = ["--preset", "debug_cpu", "--output_dir", str(tmp_path / "run")]
    if where == "another error":
        with pytest.raises(ValueError, match="a real bug"):
            train.main(argv)
        return
    assert train.main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("qstar_ds: interrupted: stopped at once without saving")
