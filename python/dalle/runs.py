"""Run folders: what a trained run holds and how it is read and written (the commands import this, never a
trainer).

- the transformer's model folder (``RUN/model.safetensors`` + ``RUN/config.json``, ``save_run_model`` /
  ``load_run_model``), or the newest verified checkpoint of a run stopped early (``read_model``, ``export``);
- the frozen dVAE a run uses (``load_dvae``) and the digest that identifies a file (``file_digest``);
- what makes a fresh run in a folder an accident (``fresh_run_problem``).
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

import torch

from . import checkpoint
from .common import UnsafeFileError, convert_hint, load_pretrained, pretrained_files, save_pretrained
from .dvae import DVAE
from .model import DALLE, PRESETS, DALLEConfig
from .safe_io import check_state_dict, expected_state

MODEL_TYPE = "dalle"  # config.json's model_type of the transformer
RUN_META = ("train_config", "step", "dvae", "dvae_digest")  # what a run saves beside its model's config
LEGACY_CHECKPOINT = "checkpoint.pt"  # an earlier version's checkpoint: converted once by python -m dalle.convert


# Settings a resume may change (README "Checkpoints and resuming"): the length, the bookkeeping, the hardware and
# the process layout. Every other field must equal the checkpoint's; --dvae, --data and --tokenizer are compared by
# what their files hold (digests), --precision by what it resolves to on this machine.
TRANSFORMER_RESUMABLE = frozenset({"run", "steps", "ckpt_every", "keep_checkpoints", "max_nonfinite_steps", "log_every",
                       "sample_every", "n_sample_captions", "progress", "device", "threads", "attn_backend",
                       "checkpoint_activations", "fsdp", "shard_size", "powersgd_rank", "powersgd_start",
                       "powersgd_layout", "dvae", "data", "tokenizer", "precision", "param_dtype"})


def run_identity(train_config: dict, digests: dict) -> dict:
    """What a resume of a transformer run must repeat, as ``{flag: value}``: every setting of ``train_config`` (a
    ``TrainConfig`` as a dict) outside ``TRANSFORMER_RESUMABLE``, and ``digests`` (``--dvae``, ``--tokenizer``,
    ``--data``: what the files hold; ``--precision``: resolved)."""
    out = {"--" + k.replace("_", "-"): v for k, v in train_config.items() if k not in TRANSFORMER_RESUMABLE}
    preset = PRESETS.get(train_config.get("preset"), {})
    for name in ("n_layers", "n_heads", "head_dim"):  # 0 means the preset's: compared as what the model has
        flag = "--" + name.replace("_", "-")
        if flag in out and not out[flag]:
            out[flag] = preset.get(name, 0)
    return out | digests


def file_digest(path) -> str:
    """The first 16 hex digits of the SHA-256 of the file ``path`` (read in 1 MiB pieces)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def load_dvae(path, device="cpu"):
    """The dVAE in folder ``path`` (``DVAE.load``), on ``device``, in eval mode."""
    try:
        return DVAE.load(path, map_location=device)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"cannot load the dVAE: {e}; train one first (python -m dalle.train_dvae --run DIR) "
                                "or pass --dvae DIR") from None


def run_dvae_path(run, ckpt) -> Path:
    """The dVAE folder a run's checkpoint ``ckpt`` was trained with: the folder it records, else ``RUN/dvae``
    (the pipeline's) when the run folder was moved. When the run records its dVAE's digest (runs written since
    the digest was added), the folder's weights must match it: a ValueError names the folders looked at
    otherwise, so a run never decodes its codes with another dVAE."""
    run = Path(run)
    if ckpt.get("dvae") is not None and not isinstance(ckpt["dvae"], str):
        raise ValueError(f"{run}: the run's config records its dVAE as {ckpt['dvae']!r}, not a folder path")
    recorded = Path(ckpt["dvae"]) if ckpt.get("dvae") else None
    looked = [p for p in (recorded, run / "dvae") if p is not None]
    found = [p for p in looked if pretrained_files(p)[0].is_file()]
    digest = ckpt.get("dvae_digest")
    if digest is None:  # an older run: the first dVAE found
        return found[0] if found else looked[0]
    for p in found:
        if file_digest(pretrained_files(p)[0]) == digest:
            return p
    if not found:
        return looked[0]  # the loader names what is missing
    raise ValueError(f"the dVAE this run was trained with (weights digest {digest}) is not at "
                     f"{' or '.join(map(str, looked))}: {', '.join(map(str, found))} holds another dVAE")


def check_finite(state_dict: dict, where) -> None:
    """``ValueError`` naming the first tensor of ``state_dict`` that holds NaN or inf: a model file never holds
    one (a diverged run must not replace a good model)."""
    for k, v in state_dict.items():
        if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{where}: {k} is not finite; the model is not written")


def save_run_model(run, model: DALLE, meta: dict) -> Path:
    """Write the transformer as ``run/model.safetensors`` + ``run/config.json`` (its config's fields, the
    model_type and ``meta``: ``train_config``, ``step``, ``dvae``); ``load_run_model`` reads it back.
    ``ValueError`` (nothing written) when a weight is not finite."""
    state = model.state_dict()
    check_finite(state, run)
    return save_pretrained(run, state, {"model_type": MODEL_TYPE, **model.cfg.to_dict(), **meta})


def load_run_meta(run) -> dict:
    """``RUN_META`` of a run: from ``RUN/config.json`` alone (no weights read) when the run has its final model,
    else from its newest verified checkpoint's ``train_state.json``."""
    config = pretrained_files(run)[1]
    if config.is_file():
        meta = checkpoint.read_json(config, "model config")
        return {k: meta.get(k) for k in RUN_META}
    folder = _newest(run)
    ts = checkpoint.read_json(folder / checkpoint.TRAIN_STATE, "train state")
    return {k: ts.get(k) for k in RUN_META}


def _newest(run) -> Path:
    run = Path(run)
    folder, skipped = checkpoint.newest_verified(run)
    if folder is not None:
        return folder
    if skipped:
        raise ValueError(f"no checkpoint of {run} verifies (newest {skipped[0][0]}: {skipped[0][1]})")
    if (run / LEGACY_CHECKPOINT).is_file():
        raise UnsafeFileError(f"{run / LEGACY_CHECKPOINT} is a checkpoint of an earlier version of dalle; "
                              f"{convert_hint(run, trust=True)}")
    raise FileNotFoundError(f"no trained model in {run}: looked for {pretrained_files(run)[0]} + "
                            f"{pretrained_files(run)[1]} (the final model) and checkpoints in "
                            f"{run / checkpoint.CHECKPOINT_DIR}")


def check_weights_match(cfg: DALLEConfig, state_dict: dict, where) -> None:
    """``ValueError`` unless ``state_dict`` holds exactly the tensors (names and shapes) of ``DALLE(cfg)``,
    checked on the meta device before anything is allocated (a config.json edited to a billion layers would
    otherwise fill the memory before ``load_state_dict`` could object); names, shapes and dtypes by
    ``safe_io.check_state_dict``, the rule every model reader shares."""
    blocks = {k.split(".")[1] for k in state_dict if k.startswith("blocks.")}
    if len(blocks) != cfg.n_layers:
        raise ValueError(f"{where}: the config says {cfg.n_layers} layers but the weights hold {len(blocks)}")
    check_state_dict(where, expected_state(lambda: DALLE(cfg)), state_dict)


def read_model(folder) -> tuple[DALLE, dict]:
    """``(DALLE, train_state)``: the transformer of the checkpoint ``folder`` assembled whole on the CPU (one
    process, no process group, any layout it was written on), and its ``train_state.json``. The folder must
    verify (``checkpoint.verify``); ``ValueError`` otherwise."""
    folder = Path(folder)
    problem = checkpoint.verify(folder)
    if problem:
        raise ValueError(f"checkpoint {folder} does not verify: {problem}")
    ts = checkpoint.read_json(folder / checkpoint.TRAIN_STATE, "train state")
    if ts.get("model_type") != MODEL_TYPE:
        raise ValueError(f"checkpoint {folder} is of a {ts.get('model_type')!r} run, not the transformer's")
    with torch.device("meta"):
        model = DALLE(DALLEConfig.from_dict(ts["model_config"]))
    model.to_empty(device="cpu")
    state = {"model": {f"model.{k}": v for k, v in model.state_dict().items()}}
    checkpoint.load_model_state(folder, state)
    model.load_state_dict({k[len("model."):]: v for k, v in state["model"].items()})
    return model, ts


def load_run_model(run, device="cpu") -> tuple[DALLE, dict]:
    """The trained model of a run and its saved metadata (``model_config``, ``train_config``, ``step``, ``dvae``).

    Reads the final model (``RUN/model.safetensors`` + ``RUN/config.json``), else the newest verified training
    checkpoint (``RUN/dcp/step_XXXXXXXX``). Nothing read unpickles code: a run of an earlier version
    (``RUN/dalle.pt``, ``RUN/checkpoint.pt``) raises ``UnsafeFileError`` naming ``python -m dalle.convert``; a
    folder with neither ``FileNotFoundError`` naming the files looked for.
    """
    run = Path(run)
    weights, config = pretrained_files(run)
    if weights.is_file() or config.is_file():
        state_dict, meta = load_pretrained(run, MODEL_TYPE)
        meta = {k: meta.get(k) for k in RUN_META} | {"model_config": meta}
        try:
            cfg = DALLEConfig.from_dict(meta["model_config"])
        except (TypeError, ValueError, OverflowError) as e:  # a config.json edited by hand, or not ours
            raise ValueError(f"{run / 'config.json'} is not a transformer config ({e})") from None
        check_weights_match(cfg, state_dict, run)
        model = DALLE(cfg)
        model.load_state_dict(state_dict)
        return model.to(device).eval(), meta
    if (run / "dalle.pt").is_file():
        raise UnsafeFileError(f"{run} holds a model of an earlier version of dalle ({run / 'dalle.pt'}, a torch "
                              f"pickle), which is no longer read; {convert_hint(run, trust=False)}")
    model, ts = read_model(_newest(run))
    meta = {k: ts.get(k) for k in RUN_META} | {"model_config": ts["model_config"]}
    return model.to(device).eval(), meta


EXPORT_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export(run, folder=None, log=print, dtype: str = "fp32") -> DALLE:
    """Write the weights of ``run``'s newest verified checkpoint (or ``folder``) as ``RUN/model.safetensors`` +
    ``RUN/config.json``, the format ``dalle.generate`` reads, and return that model (CPU, eval mode). One
    process, no process group: the model is assembled whole in memory (about 4 bytes per parameter).

    ``dtype``: ``fp32`` (default; a checkpoint's 16-bit weights, ``--param-dtype``, are exact in it), ``bf16`` or
    ``fp16``: every tensor written in that dtype (``config.json`` records it as ``weights_dtype``); the model
    returned is in it too. ``ValueError`` for another ``dtype``."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    run = Path(run)
    folder = _newest(run) if folder is None else Path(folder)
    model, ts = read_model(folder)
    model = model.to(EXPORT_DTYPES[dtype])
    out = save_run_model(run, model, {k: ts.get(k) for k in RUN_META} | {"weights_dtype": dtype})
    log(f"exported {folder} (step {ts['step']}) to {out}")
    return model.eval()


def fresh_run_problem(run, model_files=("model.safetensors",)) -> str | None:
    """Why starting a fresh run in folder ``run`` would replace an earlier one (its trained model, its checkpoints
    or an earlier version's checkpoint), or None."""
    run = Path(run)
    found = [str(run / n) for n in model_files if (run / n).is_file()]
    if checkpoint.has_checkpoints(run):
        found.append(f"checkpoints in {run / checkpoint.CHECKPOINT_DIR}")
    if (run / LEGACY_CHECKPOINT).is_file():
        found.append(str(run / LEGACY_CHECKPOINT))
    if not found:
        return None
    return (f"{run} already holds a trained run ({', '.join(found)}): continue it with --resume, train into "
            "another folder, or pass --force to start over (its model and checkpoints are then replaced)")


# What a fresh run with --force removes from its folder before it starts: the earlier run's model, checkpoints and
# what was derived from its data (a dVAE, reranker or token shards in subfolders stay: the pipeline reuses them).
RUN_OUTPUTS = ("model.safetensors", "config.json", "tokenizer.json", "text_tokens.npy", "text_tokens.json",
               "data_cache.pt", "metrics.csv", "eval.json", "train_config.json", LEGACY_CHECKPOINT)


@contextlib.contextmanager
def lock_run(run):
    """Hold the exclusive lock ``RUN/.lock`` (``fcntl.flock``) while the block runs: two trainings in one folder
    would write the same checkpoints. ``OSError`` naming the folder when another process holds it; the lock goes
    with the block, or with the process however it ends."""
    import fcntl

    run = Path(run)
    created = not run.exists()
    run.mkdir(parents=True, exist_ok=True)
    f = open(run / ".lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise OSError(f"{run} is in use by another training process (it holds {run / '.lock'}); wait for it to "
                      "end, or train into another folder") from None
    try:
        yield
    finally:
        f.close()
        if created and [p.name for p in run.iterdir()] == [".lock"]:  # a run that wrote nothing leaves no folder
            (run / ".lock").unlink()
            run.rmdir()


def clear_run(run) -> None:
    """What ``--force`` removes before a fresh run: ``RUN/dcp`` and ``RUN_OUTPUTS``, so that nothing of the earlier
    run (its model, its tokenizer, its caches) is left beside the new one, even if the new one stops early."""
    import shutil

    run = Path(run)
    shutil.rmtree(run / checkpoint.CHECKPOINT_DIR, ignore_errors=True)
    for name in RUN_OUTPUTS:
        (run / name).unlink(missing_ok=True)
