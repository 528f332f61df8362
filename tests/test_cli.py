"""Command lines: every bad argument is a one-line usage error (exit 2, the flag named, no traceback) before any
work starts and before any folder is written; flags that do nothing for the run at hand say so; every option
has help; the README and the help name only files the repository holds (or that a command writes)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dalle.convert
import dalle.encode
import dalle.export
import dalle.generate
import dalle.pipeline
import dalle.plan
import dalle.rerank
import dalle.runs
import dalle.train
import dalle.train_dvae
from dalle_kernels import emu_mutations
from dalle_kernels import masks

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = not torch.cuda.is_available()


class WorkStarted(Exception):
    """Raised by the stand-ins of the training and sampling functions: a check came after the work."""


def _refuse(*args, **kwargs):
    raise WorkStarted


@pytest.fixture
def no_work(monkeypatch):
    """Every function that trains, samples or loads a model fails if called."""
    monkeypatch.setattr(dalle.train, "train", _refuse)
    monkeypatch.setattr(dalle.train_dvae, "train_dvae", _refuse)
    monkeypatch.setattr(dalle.rerank, "train_for_run", _refuse)
    monkeypatch.setattr(dalle.generate, "sample_captions", _refuse)
    for name in ("train", "train_dvae", "train_for_run", "sample_captions"):  # as the pipeline imports them
        monkeypatch.setattr(dalle.pipeline, name, _refuse)


def usage_error(main, argv, capsys, flag):
    """Run ``main(argv)``; it must exit 2 with one line on stderr naming ``flag`` and no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert flag in lines[0] and "error" in lines[0], err
    assert "Traceback" not in err
    return lines[0]


# ------------------------------------------------------------------------------------------------ pipeline
PIPELINE_BAD = [
    (["--temperature", "-1"], "--temperature"),
    (["--steps", "0"], "--steps"),
    (["--dvae-steps", "0"], "--dvae-steps"),
    (["--dvae-images", "x"], "--dvae-images"),
    (["--top-k", "0"], "--top-k"),
    (["--rerank", "0"], "--rerank"),
    (["--eval-captions", "0"], "--eval-captions"),
    (["--reranker-steps", "-1"], "--reranker-steps"),
    (["--batch-size", "-3"], "--batch-size"),
    (["--lr", "0"], "--lr"),
    (["--warmup", "-1"], "--warmup"),
    (["--cond-dropout", "1"], "--cond-dropout"),
    (["--guidance", "nan"], "--guidance"),
    (["--seed", "-1"], "--seed"),
    (["--preset", "huge"], "--preset"),
    (["--image-embedding", "conv"], "--image-embedding"),
    (["--attn-backend", "cuda"], "--attn-backend"),
    (["--attn-backend", "cuda", "--device", "cpu"], "--attn-backend"),
    (["--device", "tpu"], "--device"),
    (["--data", "no_such_folder"], "--data"),
    (["--dvae", "somewhere"], "--dvae"),
    (["--resume"], "--resume"),
    (["--threads", "-1"], "--threads"),
]


@pytest.mark.parametrize("argv,flag", PIPELINE_BAD, ids=[" ".join(a) for a, _ in PIPELINE_BAD])
def test_pipeline_bad_arguments(tmp_path, capsys, no_work, argv, flag):
    run = tmp_path / "run"
    usage_error(dalle.pipeline.main, ["--run", str(run), *argv], capsys, flag)
    assert not run.exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("main,extra", [(dalle.pipeline.main, []), (dalle.train_dvae.main, []),
                                        (dalle.train.main, []), (dalle.rerank.main, [])])
def test_device_cuda_without_cuda(tmp_path, capsys, no_work, main, extra):
    run = tmp_path / "run"
    line = usage_error(main, ["--run", str(run), "--device", "cuda", *extra], capsys, "--device")
    assert "no CUDA device" in line
    assert not run.exists()


def test_run_that_is_a_file(tmp_path, capsys, no_work):
    f = tmp_path / "file"
    f.write_text("x")
    usage_error(dalle.pipeline.main, ["--run", str(f)], capsys, "--run")


def test_attn_backend_triton_on_cpu_without_interpreter(tmp_path, capsys, no_work, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    run = tmp_path / "run"
    line = usage_error(dalle.pipeline.main, ["--run", str(run), "--device", "cpu", "--attn-backend", "triton"],
                       capsys, "--attn-backend")
    assert "TRITON_INTERPRET" in line and not run.exists()


def test_pipeline_resume_with_a_dvae_checkpoint_is_accepted(tmp_path, capsys, no_work):
    run = tmp_path / "run"
    (run / "dvae").mkdir(parents=True)
    (run / "dvae" / "dcp" / "step_00000004").mkdir(parents=True)  # the dVAE was interrupted: --resume continues it
    with pytest.raises(WorkStarted):
        dalle.pipeline.main(["--run", str(run), "--resume", "--no-progress"])


def test_pipeline_warns_of_flags_that_do_nothing(tmp_path, capsys, no_work):
    with pytest.raises(WorkStarted):  # a warning, then the work starts
        dalle.pipeline.main(["--run", str(tmp_path / "run"), "--guidance", "3", "--rerank", "1", "--no-progress"])
    err = capsys.readouterr().err
    assert "--guidance 3" in err and "caption dropout" in err
    assert "--rerank 1" in err and "--reranker-steps 0" in err
    with pytest.raises(WorkStarted):
        dalle.pipeline.main(["--run", str(tmp_path / "run"), "--guidance", "3", "--cond-dropout", "0.1",
                             "--reranker-steps", "0", "--rerank", "1", "--no-progress"])
    assert "warning" not in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ threads
def test_thread_advice_only_for_several_threads_on_busy_cores():
    from dalle import cli

    note = cli.thread_advice(2, 1.83)
    assert note is not None and "\n" not in note
    assert "2 CPU threads" in note and "load 1.8" in note and note.endswith("--threads 1")
    assert cli.thread_advice(1, 5.0) is None  # one thread already
    assert cli.thread_advice(8, 0.1) is None  # idle cores
    assert cli.thread_advice(8, None) is None  # no load average on this system


def _busy(monkeypatch, load=1.5):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load, load))


@pytest.mark.parametrize("main,extra", [(dalle.pipeline.main, []), (dalle.train_dvae.main, []),
                                        (dalle.train.main, ["--dvae", None])])
def test_commands_advise_one_thread_on_busy_cores(tmp_path, capsys, no_work, monkeypatch, main, extra, dvae_path):
    """Advice only: the note is one line, and the run goes on with the threads asked for."""
    _busy(monkeypatch)
    extra = [str(dvae_path) if a is None else a for a in extra]
    argv = ["--run", str(tmp_path / "run"), "--device", "cpu", "--no-progress", *extra]
    with pytest.raises(WorkStarted):
        main(argv + ["--threads", "2"])
    notes = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "2 CPU threads" in notes[0] and "--threads 1" in notes[0], notes
    with pytest.raises(WorkStarted):
        main(argv + ["--threads", "1"])
    assert "note:" not in capsys.readouterr().err
    _busy(monkeypatch, 0.0)
    with pytest.raises(WorkStarted):
        main(argv + ["--threads", "2"])
    assert "note:" not in capsys.readouterr().err


def test_pipeline_threads_reach_every_stage(tmp_path, no_work, monkeypatch):
    seen = []

    def record(*args, **kwargs):
        seen.append(torch.get_num_threads())
        raise WorkStarted

    monkeypatch.setattr(dalle.pipeline, "train_dvae", record)
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    with pytest.raises(WorkStarted):
        dalle.pipeline.main(["--run", str(tmp_path / "run"), "--device", "cpu", "--no-progress",
                             "--threads", str(want)])
    assert seen == [want]
    assert torch.get_num_threads() == before  # set back for a caller in the same process


def test_train_threads_apply_to_the_run_only(tmp_path, monkeypatch):
    import dalle.train as t

    seen = []

    def record(cfg, *args):
        seen.append(torch.get_num_threads())
        raise WorkStarted

    monkeypatch.setattr(t, "_train", record)
    monkeypatch.setattr(t, "fresh_run_problem", lambda run: None)
    before = torch.get_num_threads()
    want = 3 if before != 3 else 2
    with pytest.raises(WorkStarted):
        t.train(t.TrainConfig(run=str(tmp_path / "run"), device="cpu", threads=want))
    assert seen == [want] and torch.get_num_threads() == before


# ------------------------------------------------------------------------------------------------ dalle.train
@pytest.fixture
def dvae_path(tmp_path):
    from dalle.dvae import DVAE, DVAEConfig

    return DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=16)).save(tmp_path / "dvae")  # the command line loads it


TRAIN_BAD = [
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--lr", "-1"], "--lr"),
    (["--clip", "0"], "--clip"),
    (["--cond-dropout", "1.5"], "--cond-dropout"),
    (["--bpe-dropout", "-0.1"], "--bpe-dropout"),
    (["--dropout", "1"], "--dropout"),
    (["--preset", "huge"], "--preset"),
    (["--precision", "fp8"], "--precision"),
    (["--image-embedding", "x"], "--image-embedding"),
    (["--n-layers", "-1"], "--n-layers"),
    (["--threads", "x"], "--threads"),
    (["--device", "cuda:x"], "--device"),
    (["--powersgd-rank", "2"], "--powersgd-rank"),
    (["--resume"], "--resume"),
    (["--sample-every", "-5"], "--sample-every"),
]


@pytest.mark.parametrize("argv,flag", TRAIN_BAD, ids=[" ".join(a) for a, _ in TRAIN_BAD])
def test_train_bad_arguments(tmp_path, capsys, no_work, monkeypatch, dvae_path, argv, flag):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    run = tmp_path / "run"
    usage_error(dalle.train.main, ["--run", str(run), "--dvae", str(dvae_path), *argv], capsys, flag)
    assert not run.exists()


def test_train_missing_dvae_lists_where_it_looked(tmp_path, capsys, no_work):
    run = tmp_path / "run"
    line = usage_error(dalle.train.main, ["--run", str(run)], capsys, "--dvae")
    assert str(run / "dvae" / "model.safetensors") in line
    usage_error(dalle.train.main, ["--run", str(run), "--dvae", str(tmp_path / "nope")], capsys, "nope")
    usage_error(dalle.train.main, ["--run", str(run), "--dvae", str(tmp_path / "nope.pt")], capsys, "nope.pt")
    assert not run.exists()


@pytest.mark.skipif(not NO_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("main,precision", [(dalle.train.main, "fp16"), (dalle.train.main, "bf16"),
                                            (dalle.train_dvae.main, "fp16")])
def test_low_precision_on_cpu(tmp_path, capsys, no_work, dvae_path, main, precision):
    run = tmp_path / "run"
    line = usage_error(main, ["--run", str(run), "--dvae", str(dvae_path), "--precision", precision]
                       if main is dalle.train.main else ["--run", str(run), "--precision", precision],
                       capsys, "--precision")
    assert "CUDA" in line and not run.exists()


def test_train_good_arguments_reach_the_trainer(tmp_path, no_work, dvae_path):
    with pytest.raises(WorkStarted):
        dalle.train.main(["--run", str(tmp_path / "run"), "--dvae", str(dvae_path), "--steps", "3"])


# ------------------------------------------------------------------------------------------------ train_dvae
TRAIN_DVAE_BAD = [
    (["--data", "/nonexistent"], "--data"),
    (["--steps", "0"], "--steps"),
    (["--batch-size", "0"], "--batch-size"),
    (["--vocab-size", "1"], "--vocab-size"),
    (["--image-size", "30"], "--image-size"),  # not divisible by the grid factor of the tiny preset
    (["--kmeans-warmup-steps", "10", "--steps", "10"], "--kmeans-warmup-steps"),
    (["--tau-start", "0"], "--tau-start"),
    (["--lr-end", "-1"], "--lr-end"),
    (["--channel-shuffle", "maybe"], "--channel-shuffle"),
    (["--precision", "half"], "--precision"),
    (["--resume"], "--resume"),
    (["--sample-every", "0"], "--sample-every"),
    (["--threads", "-1"], "--threads"),
]


@pytest.mark.parametrize("argv,flag", TRAIN_DVAE_BAD, ids=[" ".join(a) for a, _ in TRAIN_DVAE_BAD])
def test_train_dvae_bad_arguments(tmp_path, capsys, no_work, argv, flag):
    run = tmp_path / "run"
    usage_error(dalle.train_dvae.main, ["--run", str(run), *argv], capsys, flag)
    assert not run.exists()


def test_train_dvae_data_must_be_a_folder_or_table(tmp_path, capsys, no_work):
    bad = tmp_path / "captions.txt"
    bad.write_text("x")
    usage_error(dalle.train_dvae.main, ["--run", str(tmp_path / "run"), "--data", str(bad)], capsys, "--data")
    with pytest.raises(WorkStarted):
        dalle.train_dvae.main(["--run", str(tmp_path / "run"), "--data", str(tmp_path)])


# ------------------------------------------------------------------------------------------------ generate
@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A micro run written by the trainer itself (2 updates), without caption dropout."""
    from dalle.dvae import DVAE, DVAEConfig
    from dalle.train import TrainConfig, train

    root = tmp_path_factory.mktemp("cli_run")
    torch.manual_seed(0)
    dvae = root / "dvae"
    DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(dvae)
    run = root / "run"
    train(TrainConfig(run=str(run), dvae=str(dvae), preset="micro", steps=2, dataset_size=16, batch_size=4,
                      text_len=16, bpe_vocab=64, warmup=1, log_every=1, ckpt_every=2, attn_backend="torch",
                      n_sample_captions=1, progress=False, device="cpu"), log=lambda *a: None)
    return run


GENERATE_BAD = [
    (["-n", "0"], "-n"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "0"], "--top-p"),
    (["--top-p", "1.5"], "--top-p"),
    (["--temperature", "-1"], "--temperature"),
    (["--guidance", "inf"], "--guidance"),
    (["--rerank", "0"], "--rerank"),
    (["--rank-by", "clip"], "--rank-by"),
    (["--prompt-rows", "0"], "--prompt-rows"),
    (["--seed", "x"], "--seed"),
    (["--device", "gpu"], "--device"),
]


@pytest.mark.parametrize("argv,flag", GENERATE_BAD, ids=[" ".join(a) for a, _ in GENERATE_BAD])
def test_generate_bad_arguments(tmp_path, capsys, no_work, argv, flag):
    # the run folder is checked after the values: these fail whether or not it exists
    usage_error(dalle.generate.main, ["--run", str(tmp_path), "a red circle", *argv], capsys, flag)


def test_generate_unknown_run_lists_the_files_it_needs(tmp_path, capsys, no_work):
    from dalle.cli import RUN_FILES

    run = tmp_path / "nosuch"
    line = usage_error(dalle.generate.main, ["--run", str(run), "a red circle"], capsys, "--run")
    for names in RUN_FILES.values():
        for name in names:
            assert str(run / name) in line
    run.mkdir()
    (run / "model.safetensors").touch()
    line = usage_error(dalle.generate.main, ["--run", str(run), "a red circle"], capsys, "--run")
    assert "missing" in line and "tokenizer.json" in line
    (run / "model.safetensors").unlink()
    (run / "dalle.pt").touch()  # an earlier version's model file: named with the conversion, never read
    line = usage_error(dalle.generate.main, ["--run", str(run), "a red circle"], capsys, "--run")
    assert "earlier version" in line and "python -m dalle.convert" in line
    assert not (run / "generated.png").exists()


def test_rerank_unknown_run(tmp_path, capsys, no_work):
    usage_error(dalle.rerank.main, ["--run", str(tmp_path / "nosuch")], capsys, "--run")
    usage_error(dalle.rerank.main, ["--run", str(tmp_path), "--steps", "0"], capsys, "--steps")
    usage_error(dalle.rerank.main, ["--run", str(tmp_path), "--threads", "-1"], capsys, "--threads")


def test_generate_prompt_image_checks(tmp_path, capsys, no_work, trained_run):
    run = ["--run", str(trained_run), "a red circle"]
    usage_error(dalle.generate.main, [*run, "--prompt-image", str(tmp_path / "none.png")], capsys,
                "--prompt-image")
    not_image = tmp_path / "notes.png"
    not_image.write_text("not an image")
    usage_error(dalle.generate.main, [*run, "--prompt-image", str(not_image)], capsys, "--prompt-image")
    from PIL import Image

    img = tmp_path / "prompt.png"
    Image.new("RGB", (32, 32), (255, 0, 0)).save(img)
    grid_rows = dalle.runs.load_run_model(trained_run)[0].cfg.grid[0]
    line = usage_error(dalle.generate.main, [*run, "--prompt-image", str(img), "--prompt-rows", str(grid_rows)],
                       capsys, "--prompt-rows")
    assert f"1 to {grid_rows - 1}" in line
    with pytest.raises(WorkStarted):  # a valid prompt reaches the sampler
        dalle.generate.main([*run, "--prompt-image", str(img), "--prompt-rows", "1", "-n", "1"])
    with pytest.raises(WorkStarted):
        dalle.generate.main([*run, "--prompt-rows", "1", "-n", "1"])
    assert "--prompt-rows 1: has no effect without --prompt-image" in capsys.readouterr().err


def test_generate_flags_that_do_nothing(tmp_path, capsys, no_work, trained_run):
    run = ["--run", str(trained_run)]
    assert not (trained_run / "reranker").exists()
    with pytest.raises(WorkStarted):
        dalle.generate.main([*run, "a red circle", "--guidance", "3", "-n", "1"])
    err = capsys.readouterr().err
    assert "--guidance 3" in err and "without caption dropout" in err
    # --rerank with no reranker: the scorer ranks the captions it can parse, warns for the others
    with pytest.raises(WorkStarted):
        dalle.generate.main([*run, "a red circle", "a cat on a mat", "--rerank", "4", "-n", "1"])
    err = capsys.readouterr().err
    assert "'a cat on a mat'" in err and "draw order" in err and "'a red circle'" not in err
    # ... and cannot rank at all when it parses none
    usage_error(dalle.generate.main, [*run, "a cat on a mat", "--rerank", "4"], capsys, "--rerank")
    usage_error(dalle.generate.main, [*run, "a red circle", "--rank-by", "reranker", "--rerank", "2"], capsys,
                "--rank-by")
    with pytest.raises(WorkStarted):
        dalle.generate.main([*run, "a red circle", "--rank-by", "scorer", "-n", "1"])
    assert "--rank-by scorer: has no effect with --rerank 1" in capsys.readouterr().err
    with pytest.raises(WorkStarted):
        dalle.generate.main([*run, "a red circle", "--temperature", "0", "--rerank", "2", "--top-p", "0.5"])
    err = capsys.readouterr().err
    assert "same greedy draw" in err and "--top-p 0.5: has no effect" in err


def test_generate_out_must_be_a_png_file(tmp_path, capsys, no_work, trained_run):
    run = ["--run", str(trained_run), "a red circle"]
    usage_error(dalle.generate.main, [*run, "--out", str(tmp_path / "x.jpg")], capsys, "--out")
    (tmp_path / "dir.png").mkdir()
    usage_error(dalle.generate.main, [*run, "--out", str(tmp_path / "dir.png")], capsys, "--out")


def test_generate_run_without_its_dvae(tmp_path, capsys, no_work, trained_run):
    import shutil

    moved = tmp_path / "moved"
    shutil.copytree(trained_run, moved)
    dalle_dvae = dalle.runs.load_run_model(moved)[1]["dvae"]
    os.rename(dalle_dvae, dalle_dvae + ".gone")
    try:
        line = usage_error(dalle.generate.main, ["--run", str(moved), "a red circle"], capsys, "--run")
    finally:
        os.rename(dalle_dvae + ".gone", dalle_dvae)
    assert "dVAE" in line and str(moved / "dvae" / "model.safetensors") in line


# ------------------------------------------------------------------------------------------------ dalle_kernels
@pytest.mark.parametrize("argv,flag", [(["--tiles", "--block", "0", "64"], "--block"),
                                       (["--tiles", "--block", "64", "x"], "--block"),
                                       (["--block", "64", "64"], "--block"),
                                       ([], "--out")])
def test_masks_bad_arguments(capsys, argv, flag):
    usage_error(masks._main, argv, capsys, flag)


def test_masks_out_that_is_a_file(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_text("x")
    usage_error(masks._main, ["--out", str(f)], capsys, "--out")


def test_subprocess_exit_status_and_no_traceback(tmp_path):
    """Three real command lines: exit status 2, one stderr line naming the flag, no traceback, no folder."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "python"), env.get("PYTHONPATH", "")])
    run = tmp_path / "run"
    cases = [(["dalle.pipeline", "--run", str(run), "--temperature", "-1"], "--temperature"),
             (["dalle.train_dvae", "--run", str(run), "--data", "/nonexistent"], "--data"),
             (["dalle.generate", "--run", str(run), "a red circle"], "--run")]
    procs = [subprocess.Popen([sys.executable, "-m", *argv], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for argv, _ in cases]  # in parallel: torch imports
    for p, (argv, flag) in zip(procs, cases):
        out, err = p.communicate(timeout=300)
        lines = err.strip().splitlines()
        assert p.returncode == 2 and len(lines) == 1 and flag in lines[0], err
        assert "Traceback" not in err + out
    assert not run.exists()


# ------------------------------------------------------------------------------------------------ help
def script(path: str):
    """A script of the repository (not a package module), imported by path."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(Path(path).stem + "_script", REPO / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


PARSERS = {"dalle.pipeline": dalle.pipeline.build_parser, "dalle.train": dalle.train.build_parser,
           "dalle.train_dvae": dalle.train_dvae.build_parser, "dalle.generate": dalle.generate.build_parser,
           "dalle.rerank": dalle.rerank.build_parser, "dalle.convert": dalle.convert.build_parser,
           "dalle.encode": dalle.encode.build_parser, "dalle_kernels masks": masks._parser,
           "dalle.export": dalle.export.build_parser,
           "dalle_kernels.emu_mutations": emu_mutations.build_parser,
           "dalle.train --plan": dalle.plan.build_parser,
           **{path: (lambda path=path: script(path).build_parser())
              for path in ("benchmarks/summarize.py", "benchmarks/bench_attention.py", "tests/test_aot_compile.py",
                           "tests/test_aot_cuda.py",
                           "docs/dvae/probe.py")}}


def test_every_command_line_is_covered():
    """Every file of the repository that parses a command line is in PARSERS (a new one must be added)."""
    import subprocess as sp

    files = sp.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True, text=True).stdout.split()
    if not files:
        pytest.skip("not a git checkout")
    parsing = {f for f in files if re.search(r"ArgumentParser\(|cli\.Parser\(|= Parser\(", (REPO / f).read_text())}
    covered = {"python/dalle/pipeline.py", "python/dalle/train.py", "python/dalle/train_dvae.py", "python/dalle/plan.py",
               "python/dalle/generate.py", "python/dalle/rerank.py", "python/dalle/convert.py", "python/dalle/encode.py",
               "python/dalle/export.py", "dalle_kernels/masks.py", "dalle_kernels/emu_mutations.py",
               "dalle_kernels/_cli.py", "tests/test_cli.py", *(k for k in PARSERS if k.endswith(".py"))}
    assert parsing <= covered, sorted(parsing - covered)


def test_summarize_bad_files(tmp_path, capsys):
    summarize = script("benchmarks/summarize.py")
    for bad, content in (("missing.json", None), ("list.json", "[1]"), ("text.json", "not json")):
        path = tmp_path / bad
        if content is not None:
            path.write_text(content)
        with pytest.raises(SystemExit) as exc:
            summarize.main([str(path)])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "FILE.json" in err.splitlines()[-1] and "Traceback" not in err


@pytest.mark.parametrize("name", list(PARSERS))
def test_every_option_has_help(name):
    """Introspect each parser: every option and positional argument carries help text."""
    parser = PARSERS[name]()
    actions = [a for a in parser._actions if a.dest != "help"]
    for a in actions:
        assert a.help and a.help.strip(), f"{name}: {a.option_strings or a.dest} has no help"


def test_every_parser_field_is_a_flag():
    """The trainers' flags are generated from their config dataclasses: each field has a flag and help."""
    import dataclasses

    for parser, config in ((dalle.train.build_parser(), dalle.train.TrainConfig),
                           (dalle.train_dvae.build_parser(), dalle.train_dvae.TrainDVAEConfig)):
        dests = {a.dest for a in parser._actions}
        assert {f.name for f in dataclasses.fields(config)} <= dests


# Paths a command writes (run folders and what they hold) or a placeholder the reader fills in.
OUTPUT_ROOTS = ("runs/", "RUN/", "$OUT", "benchmarks/results/")
PATH_RE = re.compile(r"(?<![\w$/.-])((?:[A-Za-z_.][\w.-]*/)+[\w.<>*-]*|[\w.<>-]+\.(?:py|md|png|json|pt|tsv|csv|sh|txt|so))"
                     r"(?![\w/])")


def named_paths(text: str) -> set[str]:
    out = set()
    for m in PATH_RE.finditer(text):
        p = m.group(1).rstrip(".,;:)")
        if not p or p.startswith(("http", "//")) or "." not in p and "/" not in p:
            continue
        out.add(p)
    return out


def readme_code() -> str:
    text = (REPO / "README.md").read_text().replace("\\\n", " ")  # one line per command
    fenced = re.findall(r"```.*?\n(.*?)```", text, flags=re.S)
    indented = [ln for ln in text.splitlines() if ln.startswith("    ") and not ln.startswith("    -")]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(fenced + indented + spans)


def is_known(path: str, outputs: set[str]) -> bool:
    if path.startswith(OUTPUT_ROOTS) or path in outputs or path in RUN_OUTPUTS or "<" in path or "*" in path:
        return True
    if path in MUTATIONS or path == "build/mutations/":  # the mutation catalogue's names, the mutants' build
        return True
    if path in PLACEHOLDERS or re.fullmatch(r"[A-Z][A-Z0-9_]*(?:[./].*)?", path):  # NAME.txt, SHARDS/{..}.tar
        return True
    if path.startswith("python/") or (REPO / path).exists():
        return (REPO / path).exists()
    # a bare file name is one a run writes (dalle.pt, metrics.csv, ...) or a file of the repository
    return "/" not in path and any(REPO.rglob(path))


MUTATIONS = {m.name for m in emu_mutations.CATALOGUE}
PLACEHOLDERS = {"FILE.json", "SCRIPT.py"}  # the reader's own files, in capitals
# What the tools write inside a run folder (their help and the README name these by bare name).
RUN_OUTPUTS = {"model.safetensors", "config.json", "reranker/", "dvae/", "checkpoint.pt", "dcp/", "tokenizer.json",
               "metrics.csv", "dalle.pt", "dvae.pt", "reranker.pt",  # the last three: an earlier version's
               "samples_train.png", "samples_heldout.png", "results.json", "eval.json", "data_cache.pt",
               "generated.png", "summary.md", "samples/", "recon_XXXXXX.png", "powersgd_rank<i>.pt", "benchmarks.json",
               # dalle.encode's token shards, and what a run on them writes
               "manifest.json", "text_tokens.npy", "reconstructions_heldout.png",
               "train_state.json", "manifest.json", "rank<r>.pt"}  # in each checkpoint (dalle.checkpoint)


def test_readme_and_help_name_only_files_that_exist_or_are_written():
    text = readme_code() + "\n" + "\n".join(make().format_help() for make in PARSERS.values())
    outputs = set()
    for m in re.finditer(r"--(?:out|run|run-dir)\s+(\S+)", text):  # what an example writes
        outputs.add(m.group(1))
    for m in re.finditer(r"-m dalle\.generate [^\n]*", text):
        outputs.update(re.findall(r"--out (\S+)", m.group(0)))
    bad = sorted(p for p in named_paths(text) if not is_known(p, outputs))
    assert not bad, f"named but neither in the repository nor written by a command: {bad}"


def test_readme_examples_do_not_write_into_the_main_run():
    """The pipeline owns runs/demo; the README's other commands write elsewhere (they may read it)."""
    text = readme_code()
    for line in text.splitlines():
        if "-m dalle.train" in line or "-m dalle.generate" in line or "-m dalle.rerank" in line:
            writes = re.findall(r"--(?:run|run-dir)\s+(\S+)", line)
            if "-m dalle.generate" in line and "--out" in line:  # reads --run, writes --out (else RUN/)
                writes = re.findall(r"--out\s+(\S+)", line)
            assert all(not w.startswith("runs/demo") for w in writes), line


def test_readme_quick_start_works_on_a_cpu_as_written():
    """The first command a newcomer copies skips the CUDA build (minutes wherever nvcc is, GPU or not); the
    quick start says what to do on busy cores; the test command stays the one CI runs."""
    quick = (REPO / "README.md").read_text().split("## Quick start")[1].split("\n## ")[0]
    commands = [ln.strip() for ln in quick.splitlines() if ln.startswith("    ")]
    assert "DALLE_KERNELS_CUDA=0 pip install -e ." in commands[0] and "dalle.pipeline" in commands[0]
    assert "--threads 1" in quick
    assert ('pip install torch==2.13.0 && pip install -e ".[test]" && python -m pytest -q -p no:cacheprovider '
            "tests benchmarks --benchmark-disable") in commands


def test_preset_times_in_the_help_and_the_readme():
    """Every preset says what it costs: seconds per update on a CPU for the small ones, GPUs for the paper's."""
    from dalle.model import CPU_SECONDS_PER_UPDATE, PRESETS
    from dalle.plan import PAPER_PRESETS

    assert set(CPU_SECONDS_PER_UPDATE) | set(PAPER_PRESETS) == set(PRESETS)
    help_ = " ".join(dalle.train.build_parser().format_help().split())
    readme = " ".join((REPO / "README.md").read_text().split())
    for name, seconds in CPU_SECONDS_PER_UPDATE.items():
        assert f"{name} about {seconds:g} s" in help_
        assert f"`{name}` about {seconds:g} s" in readme
    assert all(name in help_ for name in PAPER_PRESETS) and "need GPUs" in help_ and "need GPUs" in readme


def test_convert_bad_arguments(tmp_path, capsys):
    usage_error(dalle.convert.main, [str(tmp_path / "nosuch.pt")], capsys, "path")
    (tmp_path / "old").mkdir()
    usage_error(dalle.convert.main, [str(tmp_path / "old"), "--out", str(tmp_path / "new")], capsys, "--out")
    assert not (tmp_path / "new").exists()
    usage_error(dalle.convert.main, [], capsys, "path")
    enc, dec = tmp_path / "encoder.pkl", tmp_path / "decoder.pkl"  # read only after the flags are checked
    enc.write_bytes(b"x")
    dec.write_bytes(b"x")
    out = ["--out", str(tmp_path / "new")]
    for argv, flag in ((["--openai-dvae", str(enc), str(tmp_path / "nosuch.pkl"), *out], "--openai-dvae"),
                       (["--openai-dvae", str(enc), str(dec)], "--out"),
                       (["--openai-dvae", str(enc), str(dec), "--out", str(enc)], "--out"),
                       (["--openai-dvae", str(enc), str(dec), *out, "--trust-pickle"], "--trust-pickle"),
                       ([str(tmp_path / "old"), "--openai-dvae", str(enc), str(dec), *out], "--openai-dvae")):
        usage_error(dalle.convert.main, argv, capsys, flag)
    assert not (tmp_path / "new").exists()


def test_generate_unwritable_out_is_refused_before_sampling(tmp_path, capsys, no_work, trained_run):
    blocker = tmp_path / "file"
    blocker.write_text("x")  # a file where the grid's folder would be
    line = usage_error(dalle.generate.main, ["--run", str(trained_run), "a red circle", "-n", "1",
                                             "--out", str(blocker / "sub" / "grid.png")], capsys, "--out")
    assert "nothing was sampled" in line


def test_generate_run_with_another_dvae_or_bad_files_is_a_usage_error(tmp_path, capsys, no_work, trained_run):
    """A run records its dVAE's absolute folder and digest: another dVAE in its place is refused, as are a
    model file that is not safetensors and a broken tokenizer, each as one usage line."""
    import shutil

    from dalle.dvae import DVAE, DVAEConfig

    meta = dalle.runs.load_run_model(trained_run)[1]
    assert os.path.isabs(meta["dvae"]) and meta["dvae_digest"]
    cases = {"dvae": "holds another dVAE", "model": "safetensors", "tokenizer": "tokenizers JSON",
             "config": "layers", "width": "the config and the weights disagree"}
    for what, expect in cases.items():
        run = tmp_path / what
        shutil.copytree(trained_run, run)
        if what == "dvae":  # the recorded folder is gone; RUN/dvae holds a dVAE of other weights
            dalle_dvae = meta["dvae"]
            os.rename(dalle_dvae, dalle_dvae + ".gone")
            torch.manual_seed(1)
            DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=32)).save(run / "dvae")
        elif what in ("config", "width"):  # an edited config.json: nothing is allocated for it
            import json

            config = json.loads((run / "config.json").read_text())
            config.update(n_layers=10 ** 9) if what == "config" else config.update(head_dim=128)
            (run / "config.json").write_text(json.dumps(config))
        elif what == "model":
            (run / "model.safetensors").write_bytes(b"not a safetensors file")
        else:
            (run / "tokenizer.json").write_text("{1: 2}")
        try:
            line = usage_error(dalle.generate.main, ["--run", str(run), "a red circle", "-n", "1"], capsys, "--run")
        finally:
            if what == "dvae":
                os.rename(dalle_dvae + ".gone", dalle_dvae)
        assert expect in line, (what, line)


def test_train_dvae_of_another_kind_and_bad_head_dim(tmp_path, capsys, no_work, dvae_path):
    other = tmp_path / "reranker"
    other.mkdir()
    (other / "model.safetensors").touch()
    (other / "config.json").write_text('{"model_type": "dalle_reranker"}')
    run = tmp_path / "run"
    usage_error(dalle.train.main, ["--run", str(run), "--dvae", str(other)], capsys, "--dvae")
    usage_error(dalle.train.main, ["--run", str(run), "--dvae", str(dvae_path), "--head-dim", "24"], capsys,
                "--head-dim")
    assert not run.exists()


def test_generate_caption_warnings_are_one_line_each(capsys, trained_run, tmp_path):
    dalle.generate.main(["--run", str(trained_run), "", "a red circle", "-n", "1", "--out", str(tmp_path / "g.png")])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("warning: caption 0") and "empty caption" in err[0], err


def test_pipeline_warns_about_code_embedding_with_openai_dvae(tmp_path, capsys):
    """--image-embedding dvae with OpenAI's dVAE is allowed, with a one-line warning (and parses to the end)."""
    (tmp_path / "IMAGES").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "IMAGES" / "a.png")
    (tmp_path / "IMAGES" / "a.txt").write_text("a black square")
    for f in ("encoder.pkl", "decoder.pkl"):
        (tmp_path / f).write_bytes(b"")
    a = dalle.pipeline.parse_args(["--run", str(tmp_path / "run"), "--data", str(tmp_path / "IMAGES"),
                                   "--openai-dvae", str(tmp_path / "encoder.pkl"), str(tmp_path / "decoder.pkl"),
                                   "--image-embedding", "dvae"])
    assert a.image_embedding == "dvae"
    err = capsys.readouterr().err
    assert "--image-embedding dvae with OpenAI's dVAE" in err and "Traceback" not in err


def test_a_dvae_folder_that_does_not_load_is_a_usage_error(tmp_path, capsys, no_work, dvae_path):
    """--dvae is read as the command will read it: a damaged config is one line naming the flag, not a traceback."""
    import json

    config = json.loads((dvae_path / "config.json").read_text())
    (dvae_path / "config.json").write_text(json.dumps({**config, "n_hid": True}))
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (16, 16)).save(images / "a.png")
    (images / "a.txt").write_text("a black square")
    for main, argv in ((dalle.train.main, ["--run", str(tmp_path / "r"), "--dvae", str(dvae_path)]),
                       (dalle.encode.main, ["--data", str(images), "--dvae", str(dvae_path), "--out",
                                            str(tmp_path / "o")])):
        line = usage_error(main, argv, capsys, "--dvae")
        assert "cannot be loaded" in line and "n_hid" in line, line
