"""Shared trainer plumbing: atomic checkpoints, safe model files, exact-resume RNG state, metrics logging,
device choice.

Nothing here unpickles code: torch files hold plain data and are read with ``weights_only=True``; models are
written as ``model.safetensors`` + ``config.json`` (the Hugging Face layout) and read without pickle.
"""
from __future__ import annotations

import csv
import json
import os
import pickle
import random
import tempfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch


CONVERT_COMMAND = "python -m dalle.convert"
MODEL_FILE, CONFIG_FILE = "model.safetensors", "config.json"
# config.json's model_type of each model, its name in messages and what an earlier version of dalle saved it as
# (a torch pickle; named in the conversion hint)
MODEL_NAMES = {"dalle": "transformer", "dalle_dvae": "dVAE", "dalle_reranker": "reranker"}
OLD_MODEL_FILES = {"dalle": "dalle.pt", "dalle_dvae": "dvae.pt", "dalle_reranker": "reranker.pt"}


class UnsafeFileError(ValueError):
    """A file that only full unpickling could read (an earlier version's file, or a crafted one): refused, since
    unpickling can run code from the file. The message names the one-off conversion command."""


def convert_hint(path, trust: bool) -> str:
    """The sentence that tells a user how to convert ``path`` once (``trust``: it needs ``--trust-pickle``)."""
    if trust:
        return (f"if you trust where it came from, convert it once with `{CONVERT_COMMAND} {path} --trust-pickle` "
                "(--trust-pickle runs code from the file; never give it for a file from an unknown source)")
    return f"convert it once with `{CONVERT_COMMAND} {path}` (it reads the old file without unpickling code)"


def fsync_dir(path) -> None:
    """Flush folder ``path``'s entries (a rename into it) to disk."""
    dir_fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _atomic_write(path, write) -> Path:
    """``write(f)`` into a temporary file in the same folder, fsync, then rename over ``path``.

    A crash (even SIGKILL) at any point leaves either the old file or the new one, never a torn one.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)  # as open() would create it: files people share are not owner-only
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


# exact types: a subclass (a NumPy float is a float) would be pickled as its own class
_PLAIN_LEAVES = (int, float, bool, complex, str, bytes, type(None), torch.dtype, torch.device)


def check_plain(obj, where: str = "obj") -> None:
    """``TypeError`` naming the first entry of ``obj`` that is not plain data: tensors, numbers, strings, bytes,
    None, dtypes and devices, in dicts (string or number keys), lists and tuples. Exactly what
    ``torch.load(weights_only=True)`` reads back without running code from the file."""
    if type(obj) in _PLAIN_LEAVES or type(obj) in (torch.Tensor, torch.nn.Parameter):
        return
    if type(obj) in (dict, OrderedDict):
        for k, v in obj.items():
            if not isinstance(k, (str, int, float, type(None))):
                raise TypeError(f"{where} has a key of type {type(k).__name__}; a file holds plain data only")
            check_plain(v, f"{where}[{k!r}]")
    elif type(obj) in (list, tuple, torch.Size):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}; a file holds plain data "
                        "only (tensors, numbers, strings, lists, tuples, dicts)")


def atomic_save(obj, path) -> Path:
    """``torch.save`` of plain data (``check_plain``: tensors, numbers, strings, lists, tuples, dicts) to
    ``path``, atomically. ``load_checkpoint`` reads it back with ``weights_only=True``; no pickled classes go in,
    so ``TypeError`` for anything else, before anything is written.
    """
    check_plain(obj, Path(path).name)
    return _atomic_write(path, lambda f: torch.save(obj, f))


def unpickling_refusal(error: Exception) -> str:
    """The first line of why a restricted unpickler (``torch.load(weights_only=True)``'s or dalle's) refused a
    file (e.g. ``Unsupported global: GLOBAL pathlib.Path.write_text ...``), at most 200 characters, without
    torch's preamble."""
    return str(error).rsplit("WeightsUnpickler error:", 1)[-1].strip().splitlines()[0][:200]


def load_checkpoint(path, map_location="cpu"):
    """A torch file of plain data (a training checkpoint, the data cache, PowerSGD state), read with
    ``torch.load(weights_only=True)``: no code from the file runs.

    Raises ``FileNotFoundError`` when ``path`` is missing, and ``UnsafeFileError`` (a ``ValueError``) naming
    ``python -m dalle.convert`` when the file holds anything but plain data (an earlier version's checkpoint,
    whose RNG state was a pickled NumPy array, or a crafted file).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = unpickling_refusal(e)
        raise UnsafeFileError(f"{path} cannot be read without running code from it, so it is refused (the safe "
                              f"reader stopped at: {reason}); it is a file of an earlier version of dalle or not a "
                              f"dalle file; {convert_hint(path, trust=True)}") from None


def save_pretrained(folder, state_dict: dict, config: dict) -> Path:
    """Write ``folder/model.safetensors`` (the tensors of ``state_dict``) and ``folder/config.json`` (``config``,
    JSON), each atomically; the folder layout of Hugging Face models. Returns ``folder``."""
    from safetensors.torch import save

    folder = Path(folder)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}
    text = json.dumps(config, indent=2) + "\n"  # before any write: a config that is not plain data fails here
    _atomic_write(folder / MODEL_FILE, lambda f: f.write(save(tensors, metadata={"format": "pt"})))
    _atomic_write(folder / CONFIG_FILE, lambda f: f.write(text.encode()))
    return folder


def pretrained_files(path) -> tuple[Path, Path]:
    """``(model.safetensors, config.json)`` of a model given as its folder or either file in it.

    ``UnsafeFileError`` for a torch (pickle) file, naming the conversion command; ``FileNotFoundError`` for a
    file name that is not there (a folder that is not there is returned as such: its files are missing).
    """
    path = Path(path)
    if path.is_dir() or (path.suffix == "" and not path.exists()):
        folder = path
    elif path.name in (MODEL_FILE, CONFIG_FILE):
        folder = path.parent
    elif path.is_file() and path.suffix in (".pt", ".pth", ".bin", ".pkl", ".ckpt"):
        raise UnsafeFileError(f"{path} is a torch (pickle) file; models are read only from {MODEL_FILE} + "
                              f"{CONFIG_FILE} (pass their folder); if it is a model file of an earlier version of "
                              f"dalle, {convert_hint(path, trust=False)}")
    elif path.is_file():
        raise ValueError(f"{path} is not a model folder or the {MODEL_FILE} / {CONFIG_FILE} in one")
    else:
        raise FileNotFoundError(f"no file {path}: a model is a folder holding {MODEL_FILE} and {CONFIG_FILE}; "
                                "pass the folder or one of those files")
    return folder / MODEL_FILE, folder / CONFIG_FILE


def load_pretrained(path, model_type: str) -> tuple[dict, dict]:
    """``(state_dict, config)`` of a model folder written by ``save_pretrained`` (or either file in it), read
    without unpickling: the tensors with safetensors, the config as JSON.

    ``config["model_type"]`` must be ``model_type``. Raises ``FileNotFoundError`` naming the files looked for,
    ``UnsafeFileError`` for a torch (pickle) file (naming ``python -m dalle.convert``), ``ValueError`` for a
    file that is not what its name says.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights, config_path = pretrained_files(path)
    missing = [str(p) for p in (weights, config_path) if not p.is_file()]
    if missing:
        name = OLD_MODEL_FILES.get(model_type)
        old = [p for p in (weights.parent / name, weights.parent.parent / name) if name and p.is_file()]
        hint = f"; {old[0]} is a file of an earlier version of dalle: {convert_hint(old[0], False)}" if old else ""
        raise FileNotFoundError(f"no {MODEL_NAMES.get(model_type, model_type)} at {path}: looked for "
                                f"{' and '.join(missing)}{hint}")
    try:
        config = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise ValueError(f"{config_path} is not a JSON model config ({type(e).__name__}: {e})") from None
    if not isinstance(config, dict) or config.get("model_type") != model_type:
        got = config.get("model_type") if isinstance(config, dict) else type(config).__name__
        raise ValueError(f"{config_path} describes a {got!r} model, expected model_type {model_type!r}")
    try:
        state_dict = load_file(weights)
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{weights} is not a safetensors file ({e})") from None
    return state_dict, config


def plain_rng_state(state: dict) -> dict:
    """``state`` (as ``random.getstate``/``np.random.get_state``/``torch`` return them, or already plain) as plain
    data: tensors, numbers and dicts, which ``torch.load(weights_only=True)`` reads back."""
    py, npy = state["python"], state["numpy"]
    if not isinstance(py, dict):
        version, internal, gauss_next = py
        py = {"version": int(version), "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next}
    if not isinstance(npy, dict):
        name, keys, pos, has_gauss, cached = npy[:5]
        if name != "MT19937":
            raise ValueError(f"numpy RNG state of generator {name!r}, expected 'MT19937'")
        npy = {"keys": torch.from_numpy(np.asarray(keys, dtype=np.int64)), "pos": int(pos),
               "has_gauss": int(has_gauss), "cached_gaussian": float(cached)}
    return {**state, "python": py, "numpy": npy}


def rng_state() -> dict:
    """Every RNG a training step draws from, for exact resume, as plain data (tensors, numbers, dicts)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return plain_rng_state(state)


def set_rng_state(state: dict) -> None:
    """Restore the RNGs from ``rng_state()``'s dict."""
    state = plain_rng_state(state)
    py, npy = state["python"], state["numpy"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    np.random.set_state(("MT19937", npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _step_of(row: dict):
    """The step of a metrics row, or None for a row that is not one (torn by a kill, or edited)."""
    try:
        return int(row.get("step") or "")
    except ValueError:
        return None


class MetricsLogger:
    """Appends rows to ``metrics.csv`` (and TensorBoard scalars when tensorboard is installed).

    On resume, rows past the resumed step are dropped so the file matches an uninterrupted run.
    """

    def __init__(self, run_dir, resume_step: int | None = None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fields: list[str] | None = None
        if resume_step is not None and self.path.exists():
            with open(self.path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if _step_of(r) is not None and _step_of(r) <= resume_step]
            if rows:
                self.fields = list(rows[0].keys())
                tmp = self.path.with_suffix(".csv.tmp")
                with open(tmp, "w", newline="") as f:
                    w = csv.DictWriter(f, fieldnames=self.fields)
                    w.writeheader()
                    w.writerows(rows)
                os.replace(tmp, self.path)
            else:  # resumed at (or before) the first logged step: the old rows belong to another run
                self.path.unlink()
        elif self.path.exists():
            self.path.unlink()
        self.tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
            except Exception:  # tensorboard not installed: CSV only
                self.tb = None

    def log(self, step: int, **values) -> None:
        row = {"step": step, **{k: (float(v) if isinstance(v, (int, float, torch.Tensor)) else v)
                                for k, v in values.items()}}
        new = not self.path.exists() or self.fields is None
        if self.fields is None:
            self.fields = list(row.keys())
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.fields, extrasaction="ignore")
            if new:
                w.writeheader()
            w.writerow(row)
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, float):
                    self.tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def pick_device(device: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when available, else CPU."""
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def autocast_context(device: torch.device, precision: str = "auto"):
    """bf16 autocast on CUDA (fp16 when asked), a no-op context on CPU or with precision='fp32'."""
    import contextlib

    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return torch.autocast("cuda", dtype=dtype)
