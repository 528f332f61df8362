"""Training checkpoints: one format for every launch mode (one process, DDP, FSDP on any mesh) and both trainers.

A checkpoint is a folder ``RUN/dcp/step_XXXXXXXX`` holding

- ``.metadata`` and ``__R_0.distcp``: the model, the optimizer and the trainer's own tensors as a Torch
  Distributed Checkpoint (DCP), keyed by parameter name, so that DCP reshards them onto any layout on load (a run
  written by one process resumes on a 2 x 2 mesh and the other way round);
- ``rank<r>.pt``: each process's own state (RNG, PowerSGD error feedback), plain data read with
  ``weights_only=True``; restored only on the layout that wrote it;
- ``train_state.json``: the step, the schedules, the gradient scaler, the configs, the run's identity (what a
  resume must repeat) and the layout;
- ``manifest.json``: the size and SHA-256 of every other file, written last and atomically, after which the
  folder is renamed from ``.step_XXXXXXXX.tmp`` into place. Without it a folder is not a checkpoint.

``verify`` checks a folder against its manifest before anything of it is loaded (``newest_verified`` picks the
newest folder that verifies and says why it skipped newer ones). Reading runs no code from the files: DCP's
``.metadata`` (a pickle) goes through an unpickler that admits DCP's own metadata classes only, and the files it
names must be plain names listed in the manifest, so no reader opens anything outside the folder; DCP's
non-tensor items are read with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import re
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import StorageMeta

from .common import UnsafeFileError, _atomic_write, atomic_save, fsync_dir, load_checkpoint

CHECKPOINT_DIR = "dcp"
MANIFEST = "manifest.json"
TRAIN_STATE = "train_state.json"
FORMAT = 1  # manifest.json's "format"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_PLAIN_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")  # a file directly in the checkpoint folder
_MAX_JSON = 64 << 20  # bytes: manifest.json and train_state.json are a few KB; anything past this is not ours


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def step_dirs(run) -> list[Path]:
    """Every ``RUN/dcp/step_XXXXXXXX`` folder (verified or not), oldest first."""
    root = Path(run) / CHECKPOINT_DIR
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name) and p.is_dir())


def checkpoints(run) -> list[Path]:
    """The finished checkpoints of ``run`` (folders with a manifest), oldest first; ``verify`` says whether one
    is intact."""
    return [p for p in step_dirs(run) if (p / MANIFEST).is_file()]


def has_checkpoints(run) -> bool:
    """Whether ``run`` holds checkpoint folders (finished or not): a fresh run there would mix with them."""
    return bool(step_dirs(run))


def read_json(path: Path, what: str) -> dict:
    """A small JSON object from ``path``; ``ValueError`` naming the file when it is too big, not JSON or not an
    object."""
    size = path.stat().st_size
    if size > _MAX_JSON:
        raise ValueError(f"{path}: {size} bytes, more than a {what} can be ({_MAX_JSON})")
    try:
        value = json.loads(path.read_bytes())
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ValueError(f"{path} is not JSON ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _write_manifest(folder: Path, step: int) -> None:
    files = {}
    for p in sorted(folder.iterdir()):
        if p.name == MANIFEST or p.name.startswith("."+MANIFEST):
            continue
        if not p.is_file() or not _PLAIN_NAME.match(p.name):
            raise RuntimeError(f"{folder}: unexpected entry {p.name!r} in a checkpoint being written")
        files[p.name] = {"bytes": p.stat().st_size, "sha256": _sha256(p)}
    text = json.dumps({"format": FORMAT, "step": step, "files": files}, indent=1)
    _atomic_write(folder / MANIFEST, lambda f: f.write(text.encode()))


def verify(folder) -> str | None:
    """Why the checkpoint folder ``folder`` is not intact, in a few words, or None when every file its manifest
    lists is there with the listed size and SHA-256 (and nothing unlisted that a reader would open)."""
    folder = Path(folder)
    if folder.is_symlink():
        return "the folder is a symbolic link (a checkpoint is read from its own folder only)"
    if (folder / MANIFEST).is_symlink():
        return f"{MANIFEST} is a symbolic link"
    try:
        manifest = read_json(folder / MANIFEST, "manifest")
    except FileNotFoundError:
        return f"no {MANIFEST} (unfinished, or written by an earlier version of dalle)"
    except (OSError, ValueError) as e:
        return f"unreadable {MANIFEST} ({e})"
    files = manifest.get("files")
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not isinstance(manifest.get("step"), int):
        return f"{MANIFEST} is not a format-{FORMAT} checkpoint manifest"
    if f"step_{manifest['step']:08d}" != folder.name:
        return f"{MANIFEST} is of step {manifest['step']}, not of this folder"
    for name in (".metadata", TRAIN_STATE):
        if name not in files:
            return f"{MANIFEST} does not list {name}"
    on_disk = {p.name for p in folder.iterdir()} - {MANIFEST}
    for name, entry in files.items():
        if not _PLAIN_NAME.match(name) or name in (".", "..", MANIFEST):
            return f"{MANIFEST} names {name!r}, not a file of the checkpoint folder"
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or \
                not isinstance(entry.get("sha256"), str):
            return f"{MANIFEST}: the entry of {name} is not {{bytes, sha256}}"
        path = folder / name
        if name in on_disk and path.is_symlink():
            return f"{name} is a symbolic link (a checkpoint is read from its own folder only)"
        if name not in on_disk or not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != entry["bytes"]:
            return f"{name} is {size} bytes, the manifest says {entry['bytes']} (truncated or replaced)"
    unlisted = sorted(n for n in on_disk - set(files) if n.endswith((".distcp", ".pt", ".json")) or n == ".metadata")
    if unlisted:
        return f"{unlisted[0]} is not in the manifest"
    for name, entry in files.items():  # sizes first (cheap), then the bytes
        if _sha256(folder / name) != entry["sha256"]:
            return f"{name} does not match its SHA-256 in the manifest (its bytes changed on disk)"
    try:  # what the files say must agree with the manifest: the step, and one rank<r>.pt per process
        state = read_json(folder / TRAIN_STATE, "train state")
        layout = state.get("layout")
        world = layout[1] if layout[0] == "ddp" else layout[1] * layout[2]
    except (OSError, ValueError, TypeError, IndexError, KeyError, AttributeError) as e:
        return f"{TRAIN_STATE} is not a train state ({e})"
    if state.get("step") != manifest["step"]:
        return f"{TRAIN_STATE} says step {state.get('step')!r}, the manifest {manifest['step']}"
    missing = [f"rank{r}.pt" for r in range(world) if f"rank{r}.pt" not in files]
    if missing:
        return f"{missing[0]} is not in the manifest ({world} processes wrote the checkpoint)"
    return None


def newest_verified(run, skip=()) -> tuple[Path | None, list[tuple[Path, str]]]:
    """``(newest checkpoint of run that verifies, [(newer folder skipped, why), ...])``, leaving out the folders
    named in ``skip``. In a process group rank 0 verifies and every rank gets its answer."""
    result = [None, []]
    if _rank() == 0:
        for folder in reversed(step_dirs(run)):
            if folder.name in skip:
                continue
            problem = verify(folder)
            if problem is None:
                result[0] = folder
                break
            result[1].append((folder, problem))
    if _distributed():
        box = [result]
        dist.broadcast_object_list(box, src=0)
        result = box[0]
    return result[0], result[1]


# ------------------------------------------------------------------------------------------------ safe readers
class _MetadataUnpickler(pickle.Unpickler):
    """Only what DCP's ``.metadata`` holds, by exact module and name (a dotted name, which pickle resolves as an
    attribute path, is refused: it could reach ``os.system`` through any module that imports ``os``): DCP's
    metadata dataclasses and enum, ``torch.Size``, dtypes, layouts and memory formats, paths and containers."""

    _GLOBALS = {("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata", "BytesStorageMetadata",
        "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")}
    _GLOBALS |= {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch", "Size"), ("torch", "device"),
                 ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"), ("builtins", "set"),
                 ("builtins", "frozenset"), ("builtins", "slice"), ("pathlib", "PosixPath"),
                 ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath")}

    def find_class(self, module, name):
        if "." not in name:
            if (module, name) in self._GLOBALS:
                return super().find_class(module, name)
            if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout,
                                                                              torch.memory_format)):
                return getattr(torch, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name} in a checkpoint's .metadata")


def _listed_files(folder: Path) -> set[str]:
    try:
        files = read_json(folder / MANIFEST, "manifest").get("files")
    except (OSError, ValueError):
        return set()
    return set(files) if isinstance(files, dict) else set()


def read_metadata(folder) -> object:
    """The DCP metadata of the checkpoint ``folder``, read by the restricted unpickler, after checking that every
    file it names is a plain file of the folder listed in its manifest. ``UnsafeFileError`` otherwise."""
    folder = Path(folder)
    path = folder / ".metadata"
    try:
        metadata = _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()
    except (pickle.UnpicklingError, AttributeError, ImportError, EOFError, TypeError, ValueError) as e:
        raise UnsafeFileError(f"{path}: {e}") from None
    listed = _listed_files(folder)
    for info in (getattr(metadata, "storage_data", None) or {}).values():
        rel = str(getattr(info, "relative_path", ""))
        if not _PLAIN_NAME.match(rel) or rel in (".", "..") or rel not in listed:
            raise UnsafeFileError(f"{path} points the reader at {rel!r}, not a file of the checkpoint listed in "
                                  "its manifest")
    return metadata


def _dcp_load(folder: Path, state: dict, **kwargs) -> None:
    """``dcp.load`` through the safe reader and planner; the metadata checked first, and a failure as one
    ``ValueError`` naming the checkpoint (DCP's own exception lists every rank's traceback)."""
    read_metadata(folder)
    with warnings.catch_warnings():  # one process: DCP says it loads without a process group, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        try:
            dcp.load(state, storage_reader=safe_reader(folder), planner=safe_planner(), **kwargs)
        except CheckpointException as e:
            first = next((str(err) for err in getattr(e, "failures", {}).values()), str(e)).splitlines()
            raise ValueError(f"checkpoint {folder} cannot be loaded ({first[0] if first else e}); resume from an "
                             "older one (remove this folder) or start over with --force") from None


def safe_reader(path):
    """A DCP ``FileSystemReader`` whose ``.metadata`` is read by ``_MetadataUnpickler`` (no code from the file
    runs) and whose storage entries must name plain files listed in the folder's manifest."""
    folder = Path(path)

    class SafeFileSystemReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs):
            if kwargs.get("rank") is not None:  # DCP's per-rank metadata: not written by our checkpoints
                raise FileNotFoundError(f"{folder}: no per-rank metadata")
            metadata = read_metadata(folder)
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeFileSystemReader(folder)


def safe_planner():
    """DCP's ``DefaultLoadPlanner``, but non-tensor items (the optimizer's hyperparameters) are read with
    ``torch.load(weights_only=True)`` instead of full unpickling."""
    class SafeLoadPlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            obj = torch.load(value, weights_only=True)
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
            else:
                self.state_dict[read_item.dest_index.fqn] = obj

    return SafeLoadPlanner()


# ------------------------------------------------------------------------------------------------ save and load
def save(run, step: int, state: dict, train_state: dict, rank_state: dict, keep: int = 2) -> Path:
    """Write ``RUN/dcp/step_XXXXXXXX`` (every process calls it): ``state`` (a DCP state dict: model, optimizer,
    tensors) as DCP files, ``rank_state`` (plain data) as ``rank<r>.pt``, ``train_state`` (rank 0's, JSON) as
    ``train_state.json``, then the manifest, all in ``.step_XXXXXXXX.tmp`` renamed into place once complete.
    Afterwards only the ``keep`` newest finished checkpoints stay (the new one among them)."""
    rank = _rank()
    root = Path(run) / CHECKPOINT_DIR
    final, tmp = root / f"step_{step:08d}", root / f".step_{step:08d}.tmp"
    text = json.dumps(train_state, indent=1)  # before any write: a train state that is not JSON fails here
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # a torn earlier attempt
        tmp.mkdir()
    _barrier()
    with warnings.catch_warnings():  # one process: DCP says it saves without a process group, which is the point
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(state, storage_writer=dcp.FileSystemWriter(tmp))
    atomic_save(rank_state, tmp / f"rank{rank}.pt")
    _barrier()
    if rank == 0:
        _atomic_write(tmp / TRAIN_STATE, lambda f: f.write(text.encode()))
        _write_manifest(tmp, step)
        if final.exists():  # a checkpoint of the same step (damaged, or of the run before a resume): replaced
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(root)
        # Folders of later steps are what this run resumed past (damaged or unloadable ones): they go, or they
        # would count among the kept ones and push out the checkpoint just written. Then the `keep` newest stay.
        for later in step_dirs(run):
            if int(later.name[5:]) > step:
                shutil.rmtree(later, ignore_errors=True)
        for old in checkpoints(run)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def load(folder, state: dict, layout) -> tuple[dict, dict | None]:
    """Load the verified checkpoint ``folder`` into ``state`` (a DCP state dict of this process's tensors, filled
    in place; DCP reshards). Returns ``(train_state, rank_state)``; ``rank_state`` is None when the checkpoint was
    written on another layout (its per-process state does not map onto this one)."""
    folder = Path(folder)
    train_state = read_json(folder / TRAIN_STATE, "train state")
    _dcp_load(folder, state)
    same = train_state.get("layout") == list(layout)
    rank_file = folder / f"rank{_rank()}.pt"
    rank_state = load_checkpoint(rank_file) if same and rank_file.is_file() else None
    return train_state, rank_state


def load_model_state(folder, state: dict) -> dict:
    """Fill ``state`` (``{"model": {name: tensor}}``, whole tensors) from the checkpoint ``folder`` in this one
    process (no process group; DCP assembles the shards); returns its ``train_state.json``."""
    folder = Path(folder)
    train_state = read_json(folder / TRAIN_STATE, "train state")
    _dcp_load(folder, state, no_dist=True)
    return train_state
