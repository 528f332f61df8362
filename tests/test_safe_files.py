"""Opening a file never runs code from it: every loader refuses a crafted pickle; models are safetensors + JSON;
checkpoints hold plain data (RNG states included, resume stays exact); old files convert once, on request."""
import json
import os
import random
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch

from dalle.common import (UnsafeFileError, atomic_save, load_checkpoint, load_pretrained, rng_state,
                          set_rng_state)
from dalle.convert import convert, main as convert_main
from dalle.dvae import DVAE, DVAEConfig
from dalle.model import DALLE, DALLEConfig
from dalle.rerank import FORMAT, Reranker, RerankerConfig
from dalle.runs import load_run_model, save_run_model
from dalle.train import TrainConfig, train
from dalle.train_dvae import TrainDVAEConfig, train_dvae

REPO = Path(__file__).resolve().parents[1]


class WritesMarker:
    """Unpickling this calls ``Path.write_text(marker, "x")``: code from the file, run by ``pickle``."""

    def __init__(self, marker):
        self.marker = Path(marker)

    def __reduce__(self):
        return Path.write_text, (self.marker, "x")


def craft(path, marker, **fields) -> Path:
    """A torch file laid out like a dalle file (``fields``) whose ``model`` entry writes ``marker`` when unpickled."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({**fields, "model": WritesMarker(marker)}, path)
    return path


@pytest.fixture
def marker(tmp_path):
    m = tmp_path / "MARKER"
    yield m
    assert not m.exists(), "code from a crafted file ran"


def test_the_crafted_file_runs_code_when_unpickled(tmp_path):
    """The control: full unpickling of the crafted file does write the marker (so the refusals below mean
    something)."""
    m = tmp_path / "control"
    torch.load(craft(tmp_path / "x.pt", m), weights_only=False)
    assert m.read_text() == "x"
    # --trust-pickle means exactly that: the file's code runs (then the conversion finds no weights in it)
    m.unlink()
    path = craft(tmp_path / "run" / "dalle.pt", m, model_config={}, train_config={}, step=1, dvae="")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        convert(path, trust_pickle=True)
    assert m.read_text() == "x"


def _refused(fn, marker, *words):
    with pytest.raises(UnsafeFileError) as e:
        fn()
    for w in words:
        assert w in str(e.value), (w, str(e.value))
    assert not marker.exists()


def tiny_dvae(folder) -> Path:
    torch.manual_seed(0)
    return DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(folder)


def micro_train_config(run, dvae, **kw):
    return TrainConfig(run=str(run), dvae=str(dvae), preset="micro", steps=2, dataset_size=16, batch_size=4,
                       text_len=16, bpe_vocab=48, warmup=1, log_every=1, ckpt_every=1, attn_backend="torch",
                       progress=False, n_sample_captions=1, **kw)


def test_model_loaders_refuse_crafted_files(tmp_path, marker):
    hint = "python -m dalle.convert"
    _refused(lambda: DVAE.load(craft(tmp_path / "d" / "dvae.pt", marker, config={}, state_dict={})), marker, hint)
    _refused(lambda: Reranker.load(craft(tmp_path / "r" / "reranker.pt", marker, format=2, config={})), marker,
             hint)
    run = tmp_path / "run"
    craft(run / "dalle.pt", marker, model_config={}, train_config={}, step=1, dvae="")
    _refused(lambda: load_run_model(run), marker, hint, "earlier version")
    only_ckpt = tmp_path / "run2"  # a run stopped before its final model: the checkpoint is read, safely
    craft(only_ckpt / "checkpoint.pt", marker, optimizer={}, rng={}, step=1)
    _refused(lambda: load_run_model(only_ckpt), marker, hint, "earlier version")
    # the pipeline does not train a new dVAE over an old one: it names the conversion
    from dalle.pipeline import main as pipeline

    craft(tmp_path / "p" / "dvae" / "dvae.pt", marker, config={}, state_dict={})
    _refused(lambda: pipeline(["--run", str(tmp_path / "p"), "--no-progress"]), marker, hint)
    # a pickle put where the safetensors file belongs is not unpickled either
    fake = tmp_path / "fake"
    tiny_dvae(fake)
    craft(fake / "model.safetensors", marker)
    with pytest.raises(ValueError, match="not a safetensors file"):
        DVAE.load(fake)
    assert not marker.exists()


def test_checkpoint_cache_and_powersgd_loaders_refuse_crafted_files(tmp_path, marker):
    dvae = tiny_dvae(tmp_path / "dvae")
    # transformer resume
    run = tmp_path / "t"
    craft(run / "checkpoint.pt", marker, optimizer={}, rng={}, step=1, schedule={})
    _refused(lambda: train(micro_train_config(run, dvae), resume=True, log=lambda *a: None), marker,
             "checkpoint.pt", "python -m dalle.convert")
    # the data cache, read before anything trains
    run = tmp_path / "c"
    craft(run / "data_cache.pt", marker, key={}, text=0, image=0)
    (run / "tokenizer.json").write_text("{}")
    _refused(lambda: train(micro_train_config(run, dvae), log=lambda *a: None), marker, "data_cache.pt",
             "delete it")
    # dVAE resume
    run = tmp_path / "dv"
    craft(run / "checkpoint.pt", marker, optimizer={}, rng={}, step=1, train_config={})
    _refused(lambda: train_dvae(TrainDVAEConfig(run=str(run), resume=True, progress=False)), marker,
             "python -m dalle.convert")
    # the checkpoint conversion reads it with the safe reader only, unless trusted
    _refused(lambda: convert(run), marker, "--trust-pickle")
    # PowerSGD error feedback (dalle.train reads it with load_checkpoint when resuming under torchrun)
    path = craft(tmp_path / "p" / "powersgd_rank0.pt", marker, step=1, state={})
    _refused(lambda: load_checkpoint(path), marker, "--trust-pickle")


def test_convert_refuses_crafted_files_without_the_flag(tmp_path, marker, capsys):
    path = craft(tmp_path / "run" / "dalle.pt", marker, model_config={}, train_config={}, step=1, dvae="")
    _refused(lambda: convert(path), marker, "--trust-pickle")
    _refused(lambda: convert(tmp_path / "run"), marker, "--trust-pickle")  # a folder: checked before writing
    with pytest.raises(SystemExit) as e:
        convert_main([str(tmp_path / "run")])
    assert e.value.code == 2 and "--trust-pickle" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["dalle.pt"]  # nothing written


def env():
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "python"), e.get("PYTHONPATH", "")])
    return e


def test_generate_refuses_a_crafted_run(tmp_path, marker):
    """The reported case: ``python -m dalle.generate --run DIR`` on a folder with a crafted dalle.pt."""
    run = tmp_path / "run"
    craft(run / "dalle.pt", marker, model_config={}, train_config={}, step=1, dvae="")
    (run / "tokenizer.json").write_text("{}")
    r = subprocess.run([sys.executable, "-m", "dalle.generate", "--run", str(run), "a red circle", "-n", "1"],
                       env=env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "python -m dalle.convert" in r.stderr and "earlier version" in r.stderr, r.stderr[-2000:]
    assert not marker.exists()


def test_every_torch_load_is_weights_only():
    """No torch.load in the packages or the tests reads with full unpickling (the convert command's trusted
    path, behind --trust-pickle, is the one exception)."""
    sites = []
    for root in ("dalle_kernels", "python/dalle", "tests", "benchmarks"):
        for f in (REPO / root).rglob("*.py"):
            for m in re.finditer(r"torch\.load\(([^()]*(?:\([^()]*\)[^()]*)*)\)", f.read_text()):
                sites.append((f.relative_to(REPO).as_posix(), m.group(1)))
    assert sites
    unsafe = [(f, a) for f, a in sites if "weights_only=True" not in a]
    assert unsafe == [("python/dalle/convert.py", 'path, map_location="cpu", weights_only=False'),
                      ("tests/test_safe_files.py", 'craft(tmp_path / "x.pt", m), weights_only=False')], unsafe


# ------------------------------------------------------------------------------------------- round trips
def _equal_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_transformer_round_trip(tmp_path):
    torch.manual_seed(1)
    model = DALLE(DALLEConfig.micro(code_features=6, code_feature_groups=(4, 2)))
    meta = {"train_config": {"steps": 3, "preset": "micro"}, "step": 3, "dvae": "runs/dvae"}
    folder = save_run_model(tmp_path / "run", model, meta)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "dalle" and config["grid"] == [4, 4]
    again, got = load_run_model(folder)
    assert again.cfg == model.cfg and {k: got[k] for k in meta} == meta
    _equal_state(model.state_dict(), again.state_dict())


def test_model_folders_are_plain_safetensors_and_json(tmp_path):
    """What a Hugging Face user reads: safetensors tensors and a JSON config naming the model type."""
    from safetensors import safe_open

    torch.manual_seed(2)
    for model, kind in ((DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)), "dalle_dvae"),
                        (Reranker(RerankerConfig(text_vocab=30, width=16)), "dalle_reranker")):
        folder = model.save(tmp_path / kind)
        with safe_open(folder / "model.safetensors", "pt") as f:
            assert set(f.keys()) == set(model.state_dict())
        sd, config = load_pretrained(folder, kind)
        _equal_state(model.state_dict(), sd)
        assert config["model_type"] == kind
        again = type(model).load(folder)
        assert again.cfg == model.cfg
        _equal_state(model.state_dict(), again.state_dict())
        other = "dalle_dvae" if kind == "dalle_reranker" else "dalle_reranker"
        with pytest.raises(ValueError, match=f"expected model_type '{other}'"):
            load_pretrained(folder, other)


def test_atomic_save_writes_plain_data_only(tmp_path):
    """What a checkpoint may hold is what ``weights_only=True`` reads; anything else fails before a write."""
    ok = {"model": OrderedDict(w=torch.ones(2)), "opt": {"state": {0: {"step": torch.tensor(3.0)}}, "lr": [1e-3]},
          "sched": {"best": float("inf"), "n": 0, "done": False, "none": None}, "grid": (8, 8), "name": "x",
          "size": torch.Size([2]), "dtype": torch.float16}
    assert repr(torch.load(atomic_save(ok, tmp_path / "ok.pt"), weights_only=True)) == repr(ok)
    for bad, where in (({"rng": {"numpy": np.random.get_state()}}, r"\['rng'\]\['numpy'\]\[1\] is a numpy.ndarray"),
                       ({"loss": np.float32(1.0)}, "numpy.float32"), ({"path": tmp_path}, "Path"),
                       ({"m": WritesMarker(tmp_path / "m")}, "WritesMarker")):
        with pytest.raises(TypeError, match=where):
            atomic_save(bad, tmp_path / "bad.pt")
    assert not (tmp_path / "bad.pt").exists() and not (tmp_path / "m").exists()


def test_rng_state_is_plain_data_and_restores_exactly(tmp_path):
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    random.gauss(0, 1)  # leaves a cached second normal in each generator
    np.random.randn(1)
    path = atomic_save({"rng": rng_state()}, tmp_path / "rng.pt")
    want = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3))
    for _ in range(5):  # move every generator on
        random.random(), np.random.rand(), torch.rand(1)
    set_rng_state(torch.load(path, weights_only=True)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.randn(3).tolist(), torch.rand(3))
    assert got[:3] == want[:3] and torch.equal(got[3], want[3])


def _old_run(run: Path):
    """A run folder as the earlier version wrote it: pickled model files and a checkpoint whose RNG state
    holds Python's state tuple and NumPy's state (an ndarray, which only full unpickling reads)."""
    torch.manual_seed(4)
    dvae = DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32))
    torch.save({"config": dict(vars(dvae.cfg)), "state_dict": dvae.state_dict()}, (run / "dvae").mkdir(parents=True)
               or run / "dvae" / "dvae.pt")
    model = DALLE(DALLEConfig.micro())
    meta = {"model_config": model.cfg.to_dict(), "train_config": {"steps": 2}, "step": 2,
            "dvae": str(run / "dvae" / "dvae.pt")}
    torch.save({"model": model.state_dict(), **meta}, run / "dalle.pt")
    reranker = Reranker(RerankerConfig(text_vocab=30, width=16))
    torch.save({"format": FORMAT, "config": reranker.cfg.to_dict(), "model": reranker.state_dict()},
               run / "reranker.pt")
    random.seed(5)
    np.random.seed(5)
    rng = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    opt = torch.optim.AdamW(model.param_groups(4.5e-2))  # as the trainer made it
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "rng": rng, "step": 2, **meta},
               run / "checkpoint.pt")
    return dvae, model, reranker


def test_old_run_converts_once_with_the_flag(tmp_path, capsys):
    run = tmp_path / "run"
    dvae, model, reranker = _old_run(run)
    for load in (lambda: load_run_model(run), lambda: DVAE.load(run / "dvae" / "dvae.pt"),
                 lambda: Reranker.load(run / "reranker.pt"), lambda: load_checkpoint(run / "checkpoint.pt")):
        with pytest.raises(UnsafeFileError, match="python -m dalle.convert"):
            load()
    with pytest.raises(FileNotFoundError, match=r"dvae\.pt is a file of an earlier version.*python -m dalle"):
        DVAE.load(run / "dvae")  # the new folder is looked for and the old file named
    with pytest.raises(SystemExit):  # the checkpoint's NumPy state needs unpickling: refused, nothing written
        convert_main([str(run)])
    assert not (run / "model.safetensors").exists()
    convert_main([str(run), "--trust-pickle"])
    out = capsys.readouterr().out
    assert out.count(" -> ") == 4, out
    loaded, meta = load_run_model(run)
    _equal_state(model.state_dict(), loaded.state_dict())
    assert loaded.cfg == model.cfg and meta["dvae"] == str(run / "dvae") and meta["step"] == 2
    _equal_state(dvae.state_dict(), DVAE.load(run / "dvae").state_dict())
    _equal_state(reranker.state_dict(), Reranker.load(run / "reranker").state_dict())
    # the training checkpoint is now one of today's format (dalle.checkpoint), the old file gone
    from dalle import checkpoint

    assert not (run / "checkpoint.pt").exists()
    (folder,) = checkpoint.checkpoints(run)
    assert folder.name == "step_00000002" and checkpoint.verify(folder) is None
    ck = load_checkpoint(folder / "rank0.pt")
    random.seed(5)
    np.random.seed(5)
    want = (random.random(), np.random.rand())
    random.seed(6)
    np.random.seed(6)
    set_rng_state(ck["rng"])
    assert (random.random(), np.random.rand()) == want
    state = {"model": {f"model.{k}": torch.empty_like(v) for k, v in model.state_dict().items()}}
    checkpoint.load_model_state(folder, state)
    _equal_state({f"model.{k}": v for k, v in model.state_dict().items()}, state["model"])
    # converting again finds nothing that needs the flag
    convert(run, log=lambda *a: None)
