"""The training engine keeps the last good state and says what happened (README "Checkpoints and resuming").

Each case runs the command line in this process (``dalle.train.main``, ``dalle.train_dvae.main``) on the micro
transformer: a damaged newest checkpoint (truncated, changed bytes, a missing shard, no manifest) is skipped by
name and the older one resumed to the uninterrupted run's losses; divergence (a huge step size, NaN gradients)
stops the run with one line and writes nothing non-finite; a resume with another dVAE, tokenizer or settings, a
fresh run over a trained one and an uneven global batch are usage errors that touch no file; a checkpoint's
``.metadata`` cannot point a reader outside its folder.
"""
import csv
import hashlib
import io
import json
import pickle
import shutil

import pytest
import torch
from safetensors.torch import load_file

import dalle.train
import dalle.train_dvae
from dalle import checkpoint
from dalle.common import UnsafeFileError
from dalle.dvae import DVAE, DVAEConfig
from dalle.engine import DIVERGED_EXIT, Diverged, Engine


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic in every run compared (the module's reference runs included)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dvae(tmp_path_factory):
    torch.manual_seed(0)
    return DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(tmp_path_factory.mktemp("dvae"))


def args(run, dvae, steps, *extra):
    return ["--run", str(run), "--dvae", str(dvae), "--preset", "micro", "--steps", str(steps), "--dataset-size",
            "48", "--batch-size", "8", "--text-len", "16", "--bpe-vocab", "64", "--warmup", "2", "--log-every", "1",
            "--ckpt-every", "3", "--attn-backend", "torch", "--no-progress", "--n-sample-captions", "2", *extra]


def run_main(main, argv, capsys) -> tuple[int, str, str]:
    """``(exit status, stdout, stderr)`` of a command run in this process."""
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def losses(run):
    with open(run / "metrics.csv", newline="") as f:
        return [(r["step"], r["loss"], r["grad_norm"]) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, dvae, one_thread):
    """A 9-step run straight through (its metrics and weights), and a 6-step one to damage (copied per test)."""
    root = tmp_path_factory.mktemp("runs")
    dalle.train.main(args(root / "nine", dvae, 9))
    dalle.train.main(args(root / "six", dvae, 6))
    return root


def _damage(folder, how):
    if how == "truncated":
        p = folder / "__0_0.distcp"
        p.write_bytes(p.read_bytes()[:-100])
    elif how == "changed bytes":  # same size, a few bytes in the middle of an Adam moment's storage
        p = folder / "__0_0.distcp"
        b = bytearray(p.read_bytes())
        b[len(b) // 2: len(b) // 2 + 4] = b"\x7f\xc0\x00\x00"
        p.write_bytes(bytes(b))
    elif how == "missing shard":
        (folder / "__0_0.distcp").unlink()
    elif how == "missing manifest":
        (folder / "manifest.json").unlink()


@pytest.mark.parametrize("how,why", [("truncated", "bytes, the manifest says"),
                                     ("changed bytes", "does not match its SHA-256"),
                                     ("missing shard", "__0_0.distcp is missing"),
                                     ("missing manifest", "no manifest.json")])
def test_damaged_newest_checkpoint_is_skipped_by_name(tmp_path, dvae, uninterrupted, capsys, how, why):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    (run / "model.safetensors").unlink()  # as a run killed after its step-6 checkpoint leaves it
    _damage(run / "dcp" / "step_00000006", how)
    code, out, err = run_main(dalle.train.main, args(run, dvae, 9, "--resume"), capsys)
    assert code == 0, err
    skipped = [line for line in out.splitlines() if line.startswith("skipped checkpoint")]
    assert len(skipped) == 1 and "step_00000006" in skipped[0] and why in skipped[0], out
    assert "resumed from" in out and "step_00000003 at step 3" in out
    assert losses(run) == losses(uninterrupted / "nine")  # the good state survived: the same run continues
    wa, wb = load_file(run / "model.safetensors"), load_file(uninterrupted / "nine" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_no_checkpoint_verifies_is_one_usage_error(tmp_path, dvae, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    for folder in checkpoint.step_dirs(run):
        _damage(folder, "truncated")
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    code, out, err = run_main(dalle.train.main, args(run, dvae, 9, "--resume"), capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "nothing to resume" in err and "step_00000006" in err and "step_00000003" in err
    assert before == {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}  # nothing touched


def test_huge_step_size_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path, dvae, capsys):
    run = tmp_path / "run"
    code, out, err = run_main(dalle.train.main, args(run, dvae, 30, "--lr", "1e6", "--warmup", "0",
                                                     "--ckpt-every", "1", "--keep-checkpoints", "1"), capsys)
    assert code == DIVERGED_EXIT
    (line,) = err.strip().splitlines()
    assert "stopped: step " in line and "not finite" in line or "loss is nan" in line, line
    last = checkpoint.checkpoints(run)[-1]
    assert f"the last good checkpoint is {last}" in line
    assert checkpoint.verify(last) is None and not (run / "model.safetensors").exists()
    state = {"model": {}}
    ts = checkpoint.read_json(last / checkpoint.TRAIN_STATE, "train state")
    from dalle.runs import read_model

    model, _ = read_model(last)
    assert all(torch.isfinite(p).all() for p in model.parameters()) and ts["step"] < 30
    del state


def test_nonfinite_gradients_for_k_steps_stop_the_run(tmp_path, dvae, capsys, monkeypatch):
    """Gradients that stay NaN (a hook poisons one parameter's) are skipped, never applied; after
    --max-nonfinite-steps of them in a row the run stops, and the model file of the good run is untouched."""
    run = tmp_path / "run"
    assert run_main(dalle.train.main, args(run, dvae, 3), capsys)[0] == 0
    good = load_file(run / "model.safetensors")
    real = dalle.train.DALLE

    class Poisoned(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.text_pos.register_hook(lambda g: torch.full_like(g, float("nan")))

    monkeypatch.setattr(dalle.train, "DALLE", Poisoned)
    code, out, err = run_main(dalle.train.main, args(run, dvae, 12, "--resume", "--max-nonfinite-steps", "4"),
                              capsys)
    assert code == DIVERGED_EXIT
    (line,) = err.strip().splitlines()
    assert "step 7: the gradients were not finite for 4 consecutive steps" in line, line
    # step 6's checkpoint holds step 3's weights (the poisoned updates were skipped), and it is the last good one
    assert [p.name for p in checkpoint.checkpoints(run)][-1] == "step_00000006" and "step_00000006 (" in line
    after = load_file(run / "model.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)
    from dalle.runs import read_model

    six, _ = read_model(checkpoint.checkpoints(run)[-1])  # steps 4-6 were skipped: the step-3 weights
    assert all(torch.equal(v, good[k]) for k, v in six.state_dict().items())


def test_engine_writes_nothing_non_finite(tmp_path):
    engine = Engine(tmp_path, name="t", steps=5, ckpt_every=1, log_every=1, progress=False, log=lambda *a: None)
    w = torch.nn.Parameter(torch.tensor([1.0, float("inf")]))
    with pytest.raises(Diverged, match="step 2: the parameters or the optimizer state are not finite"):
        engine.save(2, {"model": {"w": w}}, {}, {}, [w])
    assert not checkpoint.step_dirs(tmp_path)
    with pytest.raises(Diverged, match="step 1: the training loss is nan; training stopped, no checkpoint"):
        engine.end_step(1, float("nan"))


def test_uneven_global_batch_is_a_usage_error(tmp_path, dvae, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "0")
    code, _, err = run_main(dalle.train.main, args(tmp_path / "run", dvae, 3), capsys)
    assert code == 2 and "argument --batch-size: the global batch 8 is not a multiple of the 3 processes" in err
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="not a multiple of the 3 processes"):
        dalle.train.train(dalle.train.TrainConfig(run=str(tmp_path / "run"), dvae=str(dvae), batch_size=8))
    assert not (tmp_path / "run").exists()


def test_resume_refuses_another_dvae_tokenizer_or_settings(tmp_path, dvae, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}

    def refused(argv, flag, *words):
        code, _, err = run_main(dalle.train.main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1, err
        assert f"argument {flag}:" in err and all(w in err for w in words), err
        assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}  # the cache included

    torch.manual_seed(1)  # the same shapes, other weights: other codes for the same images
    same_shape = DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(tmp_path / "other")
    refused(args(run, same_shape, 9, "--resume"), "--dvae", "was trained with other settings")
    bigger = DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=64)).save(tmp_path / "bigger")
    refused(args(run, bigger, 9, "--resume"), "--dvae")
    refused(args(run, dvae, 9, "--resume", "--batch-size", "16"), "--batch-size", "8 -> 16")
    refused(args(run, dvae, 9, "--resume", "--dataset-size", "40"), "--dataset-size", "48 -> 40")
    from dalle.tokenizer import train_tokenizer

    tok = train_tokenizer(["a red circle", "a blue square above a green star"] * 3, 120, tmp_path / "tok.json")
    assert tok.vocab_size
    refused(args(run, dvae, 9, "--resume", "--tokenizer", str(tmp_path / "tok.json")), "--tokenizer")
    (run / "tokenizer.json").write_bytes((tmp_path / "tok.json").read_bytes())  # the run's own, replaced
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    refused(args(run, dvae, 9, "--resume"), "--tokenizer")
    # what may change: the length, the bookkeeping, the backend
    shutil.rmtree(run)
    shutil.copytree(uninterrupted / "six", run)
    code, out, err = run_main(dalle.train.main, args(run, dvae, 9, "--resume", "--log-every", "2", "--ckpt-every",
                                                     "2", "--keep-checkpoints", "3"), capsys)
    assert code == 0, err


def test_a_trained_run_is_never_replaced_by_accident(tmp_path, dvae, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_main(dalle.train.main, args(run, dvae, 6), capsys)
    assert code == 2 and "argument --run:" in err and "--resume" in err and "--force" in err
    assert before == {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = run_main(dalle.train.main, args(run, dvae, 4, "--force"), capsys)
    assert code == 0, err
    assert [p.name for p in checkpoint.checkpoints(run)] == ["step_00000003", "step_00000004"]
    # the dVAE trainer likewise, and a usage error writes nothing
    small = ["--n-hid", "8", "--n-init", "8", "--vocab-size", "16", "--image-size", "16", "--num-images", "32",
             "--eval-images", "4", "--batch-size", "4", "--steps", "2", "--no-progress", "--threads", "1"]
    d = tmp_path / "dvae_run"
    assert run_main(dalle.train_dvae.main, ["--run", str(d), *small], capsys)[0] == 0
    weights = (d / "model.safetensors").read_bytes()
    code, _, err = run_main(dalle.train_dvae.main, ["--run", str(d), *small], capsys)
    assert code == 2 and "already holds a trained run" in err and (d / "model.safetensors").read_bytes() == weights
    assert run_main(dalle.train_dvae.main, ["--run", str(d), *small, "--steps", "3", "--force"], capsys)[0] == 0
    assert checkpoint.checkpoints(d)[-1].name == "step_00000003"
    empty = tmp_path / "empty"
    empty.mkdir()
    code, _, err = run_main(dalle.train_dvae.main, ["--run", str(tmp_path / "d2"), *small, "--data", str(empty)],
                            capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "argument --data:" in err
    assert not (tmp_path / "d2").exists()


def test_checkpoint_metadata_cannot_point_outside_its_folder(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    folder = checkpoint.checkpoints(run)[-1]
    secret = tmp_path / "secret.distcp"
    shutil.copy(folder / "__0_0.distcp", secret)
    meta = checkpoint._MetadataUnpickler(io.BytesIO((folder / ".metadata").read_bytes())).load()
    for info in meta.storage_data.values():
        info.relative_path = "../../../secret.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(meta))
    manifest = json.loads((folder / "manifest.json").read_text())  # a consistent manifest: only the rule helps
    data = (folder / ".metadata").read_bytes()
    manifest["files"][".metadata"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert checkpoint.verify(folder) is None
    from dalle.runs import read_model

    with pytest.raises(UnsafeFileError, match="not a file of the checkpoint"):
        read_model(folder)
    manifest["files"]["../secret.distcp"] = {"bytes": 1, "sha256": "0" * 64}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    assert "not a file of the checkpoint folder" in checkpoint.verify(folder)


def _rewrite_manifest_entry(folder, name):
    """Make the manifest list ``name`` as it is now (a file rewritten together with its manifest)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    data = (folder / name).read_bytes()
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def test_a_checkpoint_that_verifies_but_does_not_load_is_skipped(tmp_path, dvae, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    (run / "model.safetensors").unlink()
    newest = run / "dcp" / "step_00000006"
    (newest / "rank0.pt").write_bytes(b"not a torch file")
    _rewrite_manifest_entry(newest, "rank0.pt")
    assert checkpoint.verify(newest) is None
    code, out, err = run_main(dalle.train.main, args(run, dvae, 9, "--resume"), capsys)
    assert code == 0, err
    assert "skipped checkpoint" in out and "step_00000006: it verifies but does not load" in out
    assert "step_00000003 at step 3" in out and losses(run) == losses(uninterrupted / "nine")


def test_verify_refuses_links_and_a_train_state_of_another_step(tmp_path, uninterrupted):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    folder = run / "dcp" / "step_00000006"
    ts = json.loads((folder / "train_state.json").read_text())
    (folder / "train_state.json").write_text(json.dumps({**ts, "step": 3}))
    _rewrite_manifest_entry(folder, "train_state.json")
    assert "train_state.json says step 3, the manifest 6" in checkpoint.verify(folder)
    outside = tmp_path / "elsewhere.distcp"
    shutil.copy(run / "dcp" / "step_00000003" / "__0_0.distcp", outside)
    (run / "dcp" / "step_00000003" / "__0_0.distcp").unlink()
    (run / "dcp" / "step_00000003" / "__0_0.distcp").symlink_to(outside)
    assert "symbolic link" in checkpoint.verify(run / "dcp" / "step_00000003")


def test_rotation_keeps_the_checkpoint_it_writes_after_resuming_past_a_damaged_one(tmp_path, dvae, uninterrupted,
                                                                                    capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    _damage(run / "dcp" / "step_00000006", "changed bytes")
    code, out, err = run_main(dalle.train.main, args(run, dvae, 5, "--resume", "--ckpt-every", "1",
                                                     "--keep-checkpoints", "1"), capsys)
    assert code == 0, err
    assert [p.name for p in checkpoint.step_dirs(run)] == ["step_00000005"]
    assert checkpoint.verify(run / "dcp" / "step_00000005") is None


def test_lr_may_change_on_resume_with_a_warning(tmp_path, dvae, uninterrupted, capsys):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    code, out, err = run_main(dalle.train.main, args(run, dvae, 9, "--resume", "--lr", "1e-4"), capsys)
    assert code == 0, err
    assert "warning: --lr 0.00045 -> 0.0001 on resume" in err and "will not equal the run it continues" in err
    lr = [float(r["lr"]) for r in csv.DictReader(open(run / "metrics.csv"))]
    assert lr[5] == pytest.approx(4.5e-4) and lr[6] < 1.1e-4


def test_force_removes_the_earlier_runs_model_and_a_second_trainer_is_locked_out(tmp_path, dvae, uninterrupted,
                                                                                  capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(uninterrupted / "six", run)
    code, out, err = run_main(dalle.train.main, args(run, dvae, 30, "--force", "--lr", "1e6", "--warmup", "0",
                                                     "--bpe-vocab", "90"), capsys)
    assert code == DIVERGED_EXIT
    assert not (run / "model.safetensors").exists() and not (run / "config.json").exists()  # not the old one
    from dalle.runs import lock_run

    with lock_run(run):  # another process training in the folder
        import subprocess
        import sys

        r = subprocess.run([sys.executable, "-m", "dalle.train", *args(run, dvae, 3, "--force")], capture_output=True,
                           text=True, timeout=300)
    assert r.returncode == 1 and "is in use by another training process" in r.stderr, r.stderr[-2000:]
