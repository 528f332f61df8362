"""Convert the files of an earlier version of dalle (torch pickles) to the safe formats, once.

    python -m dalle.convert runs/demo                    # every old file in the run folder and its subfolders
    python -m dalle.convert runs/demo/dalle.pt --out exported/dalle
    python -m dalle.convert runs/demo --trust-pickle     # also files that only full unpickling can read
    python -m dalle.convert --openai-dvae encoder.pkl decoder.pkl --out dvae/openai   # OpenAI's released dVAE

Models (``dalle.pt``, ``dvae.pt``, ``reranker.pt``) become folders of ``model.safetensors`` + ``config.json``:
the transformer's into its run folder, a dVAE's into its run folder (``RUN/dvae/`` when it sits beside a
transformer), a reranker's into ``RUN/reranker/``. A training checkpoint (``checkpoint.pt``, the transformer's or a
dVAE's) becomes a checkpoint of today's format, ``RUN/dcp/step_XXXXXXXX`` (README "Checkpoints and resuming"),
and the old file is removed once the new one reads back identical; PowerSGD state (``powersgd_rank<i>.pt``) and
the data cache (``data_cache.pt``) stay torch files, rewritten in place with plain data (the RNG states as
tensors and numbers) so that ``torch.load(weights_only=True)`` reads them.

Each file is first read with ``weights_only=True``, which runs no code from it. A file that reader refuses (an
earlier version's training checkpoint, whose NumPy RNG state was pickled, or a crafted file) is converted only
with ``--trust-pickle``: that reads it with full unpickling, which runs whatever code the file holds, so give the
flag only for files you made yourself or got from a source you trust. Without it nothing is written. Every file
written is read back with the safe readers and compared with what was converted.

OpenAI's released dVAE (``encoder.pkl`` + ``decoder.pkl``, pickles of the ``dall_e`` package's modules) is read
with ``DVAE.from_openai``'s restricted unpickler, which rebuilds only tensors and that module tree (no
``--trust-pickle``, never full unpickling), and written as a dVAE model folder.
"""
from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch
import torch.nn as nn

from . import checkpoint, cli
from .common import (MODEL_FILE, OLD_MODEL_FILES, UnsafeFileError, atomic_save, convert_hint, load_checkpoint,
                     load_pretrained, plain_rng_state, save_pretrained)
from .data.shards import content_digest
from .dvae import DVAE, DVAEConfig
from .model import DALLE, DALLEConfig
from .runs import MODEL_TYPE, file_digest, run_identity

TORCH_FILES = ("checkpoint.pt", "data_cache.pt")  # and powersgd_rank<i>.pt


def old_files(folder) -> list[Path]:
    """The files of an earlier version under ``folder`` (recursively), by name."""
    names = set(OLD_MODEL_FILES.values()) | set(TORCH_FILES)
    return sorted(p for p in Path(folder).rglob("*.pt")
                  if p.is_file() and (p.name in names or p.name.startswith("powersgd_rank")))


def _read(path: Path, trust_pickle: bool):
    """``(object, needed_pickle)``; ``UnsafeFileError`` when only unpickling reads it and it is not trusted."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True), False
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise UnsafeFileError(f"{path} cannot be read without running code from it (the safe reader "
                                  f"refuses it), so it is not converted; {convert_hint(path, trust=True)}") from None
    return torch.load(path, map_location="cpu", weights_only=False), True


def kind_of(obj) -> str:
    """Which dalle file ``obj`` (the loaded contents) is: dalle, dalle_dvae, dalle_reranker, checkpoint,
    data_cache or powersgd; ``ValueError`` for anything else."""
    keys = set(obj) if isinstance(obj, dict) else set()
    if {"config", "state_dict"} <= keys:
        return "dalle_dvae"
    if {"model", "config"} <= keys and "model_config" not in keys:
        return "dalle_reranker"
    if {"optimizer", "rng", "model"} <= keys:
        return "checkpoint"
    if {"model", "model_config"} <= keys:
        return "dalle"
    if {"key", "text", "image"} <= keys:
        return "data_cache"
    if {"step", "state"} <= keys and isinstance(obj["state"], dict) and "error" in obj["state"]:
        return "powersgd"
    raise ValueError(f"not a file of dalle (top-level keys {sorted(map(str, keys))[:8]})")


def model_folder(old: Path, kind: str) -> Path:
    """Where the converted model of the old file ``old`` goes (the folder the loaders look in)."""
    if kind == "dalle":
        return old.parent
    if kind == "dalle_reranker":
        return old.parent / "reranker"
    # a dVAE trained into the transformer's run folder gets its own folder, RUN/dvae (dalle.train's default)
    return old.parent / "dvae" if (old.parent / "dalle.pt").is_file() else old.parent


def _dvae_ref(value):
    """A recorded dVAE path of an earlier version (``.../dvae.pt``) as the folder its conversion writes."""
    if isinstance(value, str) and value.endswith(".pt"):
        return str(model_folder(Path(value), "dalle_dvae"))
    return value


def _same_tensors(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k].cpu(), b[k].cpu()) for k in a)


def convert_file(path, out=None, trust_pickle: bool = False) -> str:
    """Convert one old file; returns a line saying what was written. ``out``: the model folder (models) or
    file (torch files) to write; default: where the loaders look (models) or ``path`` itself (torch files).

    Raises ``UnsafeFileError`` when the file needs unpickling and ``trust_pickle`` is false (nothing is written),
    ``ValueError`` for a file that is not dalle's.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no file {path}")
    obj, pickled = _read(path, trust_pickle)
    try:
        kind = kind_of(obj)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if kind in OLD_MODEL_FILES:
        folder = Path(out) if out else model_folder(path, kind)
        if kind == "dalle_dvae":
            state_dict, config = obj["state_dict"], dict(obj["config"])
        elif kind == "dalle_reranker":
            state_dict, config = obj["model"], {"format": obj.get("format", 1), **obj["config"]}
        else:
            state_dict = obj["model"]
            config = {**obj["model_config"], "train_config": obj.get("train_config"), "step": obj.get("step"),
                      "dvae": _dvae_ref(obj.get("dvae"))}
        if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
            raise ValueError(f"{path} looks like a {kind} file but its weights are not a dict of tensors")
        save_pretrained(folder, state_dict, {"model_type": kind, **config})
        again, _ = load_pretrained(folder, kind)
        if not _same_tensors(dict(state_dict), again):
            raise RuntimeError(f"{folder / MODEL_FILE} does not read back the tensors of {path}")
        return f"{path} -> {folder} (model.safetensors + config.json, {len(again)} tensors read back identical)"
    if kind == "checkpoint":
        if out is not None:
            raise ValueError(f"{path}: a training checkpoint is converted into its run folder (no --out)")
        obj = {**obj, "rng": plain_rng_state(obj["rng"])}
        if "dvae" in obj:
            obj["dvae"] = _dvae_ref(obj["dvae"])
        return checkpoint_to_dcp(path, obj)
    if not pickled and out is None:
        return f"{path}: already plain data, left as it is"
    target = Path(out) if out else path
    try:
        atomic_save(obj, target)
    except TypeError as e:
        raise ValueError(f"{path} ({kind}) cannot be converted: {e}") from None
    load_checkpoint(target)
    return f"{path} -> {target} ({kind}, plain data, reads with weights_only=True)"


class _Objective(nn.Module):
    """The transformer under the name the trainer's checkpoints use (``model.``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model


def checkpoint_to_dcp(path: Path, obj: dict) -> str:
    """Write the earlier version's training checkpoint ``obj`` (read from ``path``, a transformer's or a dVAE's)
    as a checkpoint of today's format in ``RUN/dcp/step_XXXXXXXX`` (``dalle.checkpoint``), read it back and
    compare, then remove ``path``. A transformer checkpoint records no digests of its tokenizer, data or
    precision: a resume of it compares those it can (the dVAE's, when recorded)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    run, step = path.parent, int(obj["step"])
    mcfg, tcfg = obj.get("model_config"), obj.get("train_config") or {}
    if not isinstance(mcfg, dict) or not isinstance(tcfg, dict):
        raise ValueError(f"{path}: a training checkpoint without its model and training configs")
    if "text_len" in mcfg:  # the transformer's
        model = DALLE(DALLEConfig.from_dict(mcfg))
        model.load_state_dict(obj["model"])
        wrapped = _Objective(model)
        opt = torch.optim.AdamW(model.param_groups(tcfg.get("weight_decay", 4.5e-2)), lr=1.0, betas=(0.9, 0.96),
                                eps=1e-8)
        tok = run / "tokenizer.json"
        data = Path(tcfg["data"]) if tcfg.get("data") else None
        digests = {"--dvae": obj.get("dvae_digest"), "--tokenizer": file_digest(tok) if tok.is_file() else None,
                   "--data": content_digest(data) if data is not None and (data / "manifest.json").is_file() else None,
                   "--precision": None if tcfg.get("precision", "auto") == "auto" else tcfg["precision"]}
        train_state = {"model_type": MODEL_TYPE, "model_config": mcfg, "train_config": tcfg,
                       "identity": run_identity(tcfg, digests), "dvae": obj.get("dvae"),
                       "dvae_digest": obj.get("dvae_digest"), "schedule": obj.get("schedule"),
                       "grad_scaler": obj.get("grad_scaler")}
        extra = {}
    else:  # the dVAE's
        model = wrapped = DVAE(DVAEConfig(**mcfg))
        model.load_state_dict(obj["model"])
        groups = [{"params": list(model.encoder.parameters()), "lr_mult": tcfg.get("encoder_lr") or 1.0},
                  {"params": list(model.decoder.parameters()), "lr_mult": 1.0}]
        opt = torch.optim.AdamW(groups, lr=1.0, betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=tcfg.get("weight_decay", 1e-4))
        train_state = {"model_type": "dalle_dvae", "model_config": mcfg, "train_config": tcfg,
                       "grad_scaler": obj.get("grad_scaler") or None}
        extra = {"kmeans_centres": obj["kmeans_centres"]} if obj.get("kmeans_centres") is not None else {}
    try:
        opt.load_state_dict(obj["optimizer"])
    except (ValueError, KeyError) as e:
        raise ValueError(f"{path}: its optimizer state is not the trainer's ({e})") from None
    msd, osd = get_state_dict(wrapped, opt)
    train_state = {**train_state, "step": step, "layout": ["ddp", 1]}
    rank_state = {"rng": obj["rng"], "data": obj.get("data"), "powersgd": None}
    folder = checkpoint.save(run, step, {"model": msd, "optim": osd, **extra}, train_state, rank_state, keep=1 << 30)
    problem = checkpoint.verify(folder)
    again = {"model": {k: torch.empty_like(v) for k, v in msd.items()}}
    checkpoint.load_model_state(folder, again)
    if problem or not _same_tensors(msd, again["model"]):
        raise RuntimeError(f"{folder} does not read back the checkpoint of {path} ({problem or 'tensors differ'})")
    path.unlink()
    return f"{path} -> {folder} (step {step}, checkpoint of this version, read back identical; {path.name} removed)"


def convert(path, out=None, trust_pickle: bool = False, log=print) -> list[str]:
    """Convert a file, or every old file under a folder. Files that need unpickling are checked first: without
    ``trust_pickle`` an ``UnsafeFileError`` lists them and nothing is written."""
    path = Path(path)
    if path.is_dir():
        if out is not None:
            raise ValueError("--out is for a single file; a folder is converted in place")
        files = old_files(path)
        if not files:
            raise FileNotFoundError(f"no files of an earlier version of dalle under {path} (looked for "
                                    f"{', '.join(sorted(set(OLD_MODEL_FILES.values()) | set(TORCH_FILES)))}, "
                                    "powersgd_rank<i>.pt)")
    elif path.is_file():
        files = [path]
    else:
        raise FileNotFoundError(f"no file or folder {path}")
    if not trust_pickle:
        refused = []
        for f in files:
            try:
                _read(f, trust_pickle=False)
            except UnsafeFileError:
                refused.append(f)
        if refused:
            listed = ", ".join(map(str, refused))
            raise UnsafeFileError(f"{listed}: cannot be read without running code from the file, so nothing was "
                                  f"converted; {convert_hint(path, trust=True)}")
    done = []
    for f in files:
        line = convert_file(f, out, trust_pickle)
        log(line)
        done.append(line)
    return done


def convert_openai_dvae(encoder, decoder, out, log=print) -> str:
    """Convert OpenAI's released dVAE (``encoder.pkl``, ``decoder.pkl``) into the model folder ``out``
    (``model.safetensors`` + ``config.json``, which ``DVAE.load`` reads), then read it back and compare.

    Raises what ``DVAE.from_openai`` raises (``UnsafeFileError`` for a file naming anything but tensors and the
    ``dall_e`` module tree, ``ValueError`` for other files); nothing is written then."""
    model = DVAE.from_openai(encoder, decoder)
    model.save(out)
    again = DVAE.load(out)
    if again.cfg != model.cfg or not _same_tensors(model.state_dict(), again.state_dict()):
        raise RuntimeError(f"{out} does not read back the dVAE converted from {encoder} and {decoder}")
    line = (f"{encoder} + {decoder} -> {out} (model.safetensors + config.json, {len(again.state_dict())} tensors "
            f"read back identical; {again.cfg.vocab_size} codes, grid {again.grid_size[0]}x{again.grid_size[1]} "
            f"at {again.cfg.image_size}x{again.cfg.image_size})")
    log(line)
    return line


def build_parser():
    p = cli.Parser(prog="python -m dalle.convert", description=__doc__.split("\n\n")[0],
                   epilog="Models become model.safetensors + config.json folders; checkpoints stay "
                          "torch files with plain data. See the README, 'Model files'.")
    p.add_argument("path", nargs="?", help="an old file (dalle.pt, dvae.pt, reranker.pt, checkpoint.pt, data_cache.pt, "
                                "powersgd_rank<i>.pt) or a folder holding some (searched recursively)")
    p.add_argument("--out", default=None, help="for a single file: the model folder (or torch file) to write "
                                               "(default: where dalle's loaders look); for --openai-dvae: the "
                                               "dVAE model folder to write (required)")
    p.add_argument("--openai-dvae", nargs=2, metavar=("ENCODER_PKL", "DECODER_PKL"), default=None,
                   help="convert OpenAI's released dVAE (encoder.pkl decoder.pkl) into the --out folder; read "
                        "with a restricted unpickler (tensors and the dall_e module tree only), instead of PATH")
    p.add_argument("--trust-pickle", action="store_true",
                   help="also convert files that only full unpickling can read; this runs code from the file: "
                        "give it only for files from a source you trust")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.openai_dvae is not None:
        if a.path is not None:
            p.error("argument --openai-dvae: converts OpenAI's two files only; give no PATH with it")
        if a.trust_pickle:
            p.error("argument --trust-pickle: not for --openai-dvae (its files are always read with the "
                    "restricted unpickler)")
        if a.out is None:
            p.error("argument --out: required with --openai-dvae (the dVAE model folder to write)")
        for flag_file in a.openai_dvae:
            if not Path(flag_file).is_file():
                p.error(f"argument --openai-dvae: no file {flag_file!r}")
        if Path(a.out).is_file():
            p.error(f"argument --out: {a.out!r} is a file; expected the dVAE model folder to write")
        try:
            convert_openai_dvae(*a.openai_dvae, a.out)
        except (ValueError, TypeError, FileNotFoundError) as e:  # UnsafeFileError is a ValueError
            print(f"{p.prog}: error: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        return
    if a.path is None:
        p.error("the following arguments are required: path (or --openai-dvae ENCODER_PKL DECODER_PKL)")
    if not Path(a.path).exists():
        p.error(f"argument path: no file or folder {a.path!r}")
    if a.out is not None and Path(a.path).is_dir():
        p.error("argument --out: only for a single file (a folder's files are converted where they are)")
    try:
        convert(a.path, a.out, a.trust_pickle)
    except (ValueError, TypeError, FileNotFoundError) as e:  # UnsafeFileError is a ValueError
        print(f"{p.prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
