"""Trainer: exact resume after SIGKILL, plateau schedule, data order, CLI validation."""
import csv
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dalle.checkpoint import checkpoints
from dalle.data.sampler import batch_indices
from dalle.schedules import PlateauSchedule
from dalle.train import TrainConfig, parse_args

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def dvae_file(tmp_path_factory):
    from dalle.dvae import DVAE, DVAEConfig

    torch.manual_seed(0)
    return DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(tmp_path_factory.mktemp("dvae"))


def train_cmd(run, dvae, steps, *extra):
    return [sys.executable, "-m", "dalle.train", "--run", str(run), "--dvae", str(dvae), "--preset", "micro",
            "--steps", str(steps), "--dataset-size", "48", "--batch-size", "8", "--text-len", "16",
            "--bpe-vocab", "64", "--warmup", "5", "--plateau-window", "3", "--plateau-patience", "1",
            "--log-every", "1", "--ckpt-every", "5", "--attn-backend", "torch", "--no-progress",
            "--n-sample-captions", "2", *extra]


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "python"), e.get("PYTHONPATH", "")])
    e["OMP_NUM_THREADS"] = "1"  # same arithmetic in every run
    return e


def losses(run):
    with open(Path(run) / "metrics.csv", newline="") as f:
        return [(int(r["step"]), r["loss"], r["loss_text"], r["loss_image"], r["lr"], r["grad_norm"])
                for r in csv.DictReader(f)]


def _workers(torchrun_pid: int) -> dict:
    """``{rank: pid}`` of the worker processes torchrun started (their environment names the rank)."""
    out = {}
    for task in Path(f"/proc/{torchrun_pid}/task").iterdir():
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            rank = [e.split(b"=", 1)[1] for e in environ if e.startswith(b"RANK=")]
            if rank:
                out[int(rank[0])] = int(pid)
    return out


def torchrun_cmd(n, cmd):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(n),
            "-m", "dalle.train", *["--run-dir" if c == "--run" else c for c in cmd[3:]]]


def test_sigkill_of_one_rank_then_resume_matches_uninterrupted(tmp_path, dvae_file):
    """Two DDP workers with PowerSGD (from update 3); SIGKILL of rank 1 alone after a checkpoint (torchrun then
    stops rank 0), ``--resume``: the metrics and the final weights equal an uninterrupted run's exactly (each
    rank's RNG and PowerSGD error feedback come back from the checkpoint)."""
    steps = 24
    flags = ["--powersgd-rank", "2", "--powersgd-start", "3"]
    a_run, b_run = tmp_path / "a", tmp_path / "b"
    b = subprocess.Popen(torchrun_cmd(2, train_cmd(b_run, dvae_file, steps, *flags)), env=env(), cwd=tmp_path,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 180
    while not checkpoints(b_run) and b.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    workers = _workers(b.pid)
    assert b.poll() is None and 1 in workers, "the run finished (or never started) before it could be killed"
    os.kill(workers[1], signal.SIGKILL)
    assert b.wait(timeout=120) != 0
    killed_at = int(checkpoints(b_run)[-1].name[5:])
    assert 0 < killed_at < steps and not (b_run / "model.safetensors").exists()
    r = subprocess.run(torchrun_cmd(2, train_cmd(a_run, dvae_file, steps, *flags)), env=env(), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    r = subprocess.run(torchrun_cmd(2, train_cmd(b_run, dvae_file, steps, *flags, "--resume")), env=env(),
                       cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "resumed from" in r.stdout and "PowerSGD: sent" in r.stdout
    la, lb = losses(a_run), losses(b_run)
    assert [x[0] for x in la] == list(range(1, steps + 1))
    assert la == lb
    assert float(la[-1][1]) < float(la[0][1])  # training made progress
    wa, wb = load_file(a_run / "model.safetensors"), load_file(b_run / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert any((a_run / "samples").glob("*.png"))


def test_plateau_schedule():
    s = PlateauSchedule(1.0, warmup=4, window=2, patience=2, max_halvings=2)
    assert [s(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    for step in range(4):
        s.observe(step, 10.0)  # warm-up steps are not observed
    assert s.n == 0
    step = 4
    for loss in [5, 5, 5, 5, 5, 5]:  # window means 5 (best), 5 (bad 1), 5 (bad 2 -> halve)
        s.observe(step, loss)
        step += 1
    assert s.halvings == 1 and s(step) == 0.5
    for loss in [5] * 8:
        s.observe(step, loss)
        step += 1
    assert s.halvings == 2  # capped
    t = PlateauSchedule(1.0, 4, 2, 2, 2)
    t.load_state_dict(s.state_dict())
    assert t(100) == s(100)


def test_warmup_cosine_schedule():
    import math

    from dalle.schedules import WarmupCosineSchedule

    s = WarmupCosineSchedule(1e-3, warmup=4, steps=104, end_ratio=0.1)
    assert [s(i) for i in range(4)] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])
    lrs = [s(i) for i in range(4, 105)]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)  # update 104: the end
    assert lrs[50] == pytest.approx(5.5e-4)  # half way: the mean of the two ends
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert s.state_dict() == {} and all(math.isfinite(x) for x in lrs)
    assert WarmupCosineSchedule(1.0, 0, 10)(0) == 1.0
    for bad in (dict(lr_schedule="linear"), dict(lr_end_ratio=1.5), dict(lr_end_ratio=-0.1)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(run="x", **bad)


def test_batch_indices_cover_each_epoch_once():
    n, bs = 10, 4
    seen = torch.cat([batch_indices(s, bs, n, seed=3) for s in range(5)])  # 20 = two epochs
    assert sorted(seen[:10].tolist()) == list(range(10))
    assert sorted(seen[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, bs, n, 3), batch_indices(2, bs, n, 3))


def test_config_validation(tmp_path):
    with pytest.raises(ValueError, match="preset"):
        TrainConfig(run=str(tmp_path), preset="huge")
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(run=str(tmp_path), steps=0)
    with pytest.raises(ValueError, match="precision"):
        TrainConfig(run=str(tmp_path), precision="fp8")
    from dalle.dvae import DVAE, DVAEConfig

    DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=16)).save(tmp_path / "dvae")  # the command line loads it
    cfg, resume, force = parse_args(["--run", str(tmp_path), "--steps", "7", "--no-progress"])
    assert cfg.steps == 7 and not resume and not force and not cfg.progress


def test_missing_dvae_is_a_clear_error(tmp_path):
    from dalle.train import train

    with pytest.raises(FileNotFoundError, match="dVAE"):
        train(TrainConfig(run=str(tmp_path), dvae=str(tmp_path / "nope.pt"), progress=False))


def test_ddp_two_workers_match_one_process_then_powersgd(tmp_path, dvae_file):
    """torchrun, 2 gloo workers with half a batch each: the same losses as one process until PowerSGD
    compression starts (update 3), then a compressed run that still trains; per-worker PowerSGD state saved."""
    steps = 6
    flags = ["--ckpt-every", "3"]
    one = subprocess.run(train_cmd(tmp_path / "one", dvae_file, steps, *flags), env=env(), cwd=tmp_path,
                         capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]
    cmd = train_cmd(tmp_path / "two", dvae_file, steps, *flags, "--powersgd-rank", "2", "--powersgd-start", "3",
                    "--grad-scale", "on")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "dalle.train", *["--run-dir" if c == "--run" else c for c in cmd[3:]]]
    r = subprocess.run(cmd, env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    lo, lt = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert [x[0] for x in lt] == list(range(1, steps + 1))
    for i, (a, b) in enumerate(zip(lo[:4], lt[:4])):  # losses of steps 1..4 follow uncompressed updates 0..2
        n = 6 if i < 3 else 5  # the grad norm of step 4 is already a compressed gradient's
        for x, y in zip(a[1:n], b[1:n]):
            assert float(x) == pytest.approx(float(y), rel=1e-4, abs=1e-6), i
    assert lo[5][1] != lt[5][1]  # compressed updates differ
    assert float(lt[5][1]) < float(lt[0][1])
    last = checkpoints(tmp_path / "two")[-1]
    assert last.name == f"step_{steps:08d}"
    for rank in (0, 1):  # each worker's own error feedback, in the checkpoint
        state = torch.load(last / f"rank{rank}.pt", weights_only=True)["powersgd"]
        assert state["rank"] == 2 and state["error"]


def test_cond_dropout_batches():
    """A seeded share of each batch gets the empty caption; the same rows on every data-parallel worker."""
    from dalle.data.tokens import get_batch

    n, T, V = 64, 6, 50
    data = {"text": torch.randint(0, V, (3, n, T)), "image": torch.randint(0, 9, (n, 16)), "text_vocab": V}
    cfg = TrainConfig(run="x", batch_size=16, cond_dropout=0.25)
    empty = torch.arange(T) + V
    dropped = 0
    for step in range(100):
        text, image = get_batch(data, step, cfg)
        is_empty = (text == empty).all(1)
        dropped += int(is_empty.sum())
        assert torch.equal(get_batch(data, step, cfg)[0], text)  # a pure function of the step
        assert (text[~is_empty] < V).all()
        halves = [get_batch(data, step, cfg, rank=r, world=2)[0] for r in range(2)]
        assert torch.equal(torch.stack(halves, 1).flatten(0, 1), text)
    assert abs(dropped / 1600 - 0.25) < 0.05  # binomial sd 0.011
    off = TrainConfig(run="x", batch_size=16)
    assert not any((get_batch(data, s, off)[0] == empty).all(1).any() for s in range(100))
    for bad in (dict(cond_dropout=1.0), dict(cond_dropout=-0.1), dict(image_embedding="pixels"), dict(dropout=1.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            TrainConfig(run="x", **bad)


def test_resume_with_code_embedding_and_dropouts(tmp_path, dvae_file):
    """``--image-embedding dvae --cond-dropout --dropout``: the model gets the dVAE's code features, trains,
    and a run stopped at its checkpoint resumes to the uninterrupted run's losses and weights (the residual
    dropout masks come from the RNG state the checkpoint saves)."""
    from dalle.dvae import DVAE
    from dalle.generate import load_run
    from dalle.train import train

    def cfg(run, steps):
        return TrainConfig(run=str(run), dvae=str(dvae_file), preset="micro", steps=steps, dataset_size=48,
                           batch_size=8, text_len=16, bpe_vocab=64, warmup=5, plateau_window=3,
                           plateau_patience=1, log_every=1, ckpt_every=4, attn_backend="torch", progress=False,
                           n_sample_captions=2, cond_dropout=0.3, image_embedding="dvae", dropout=0.2)

    torch.set_num_threads(1)
    train(cfg(tmp_path / "a", 8), log=lambda *a: None)
    train(cfg(tmp_path / "b", 4), log=lambda *a: None)
    train(cfg(tmp_path / "b", 8), resume=True, log=lambda *a: None)
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert [x[0] for x in la] == list(range(1, 9)) and la == lb
    model, _, _ = load_run(tmp_path / "b")
    dv = DVAE.load(dvae_file)
    feats = dv.code_features()
    assert model.cfg.code_features == feats.shape[1] and model.cfg.code_feature_groups == dv.code_feature_groups
    torch.testing.assert_close(model.image_emb.features, feats)
    wa, wb = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_metrics_of_a_run_started_again_from_step_0_replace_the_old_ones(tmp_path):
    """The pipeline's second call trains the transformer again from step 0 into the same folder: its rows
    replace the old ones (one header, no mixed rows)."""
    import csv

    from dalle.common import MetricsLogger

    old = MetricsLogger(tmp_path, tensorboard=False)
    for step in (1, 2, 3):
        old.log(step, loss=1.0)
    old.close()
    new = MetricsLogger(tmp_path, resume_step=0, tensorboard=False)
    new.log(1, loss=2.0)
    new.close()
    with open(tmp_path / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"step": "1", "loss": "2.0"}]


def test_written_files_follow_the_umask(tmp_path):
    """Models, checkpoints, tokenizers and grids are shared: written with the usual 0o666 & ~umask, not 0o600."""
    import os

    from dalle.common import atomic_save
    from dalle.images import save_grid
    from dalle.tokenizer import train_tokenizer

    old = os.umask(0o022)
    try:
        paths = [atomic_save({"x": torch.zeros(1)}, tmp_path / "c.pt"),
                 save_grid(torch.zeros(1, 3, 4, 4), tmp_path / "g.png", nrow=1),
                 train_tokenizer(["a red circle", "a blue square"], vocab_size=40).save(tmp_path / "t.json")]
    finally:
        os.umask(old)
    for p in paths:
        assert p.stat().st_mode & 0o777 == 0o644, p
