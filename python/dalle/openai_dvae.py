"""OpenAI's released dVAE (``encoder.pkl``, ``decoder.pkl`` of the ``dall_e`` package) as a ``dalle.dvae.DVAE``.

The released files are ``torch.save`` pickles of whole modules (``dall_e.encoder.Encoder``,
``dall_e.decoder.Decoder``) in torch's legacy (pre-zip) format, and unpickling can run code from a file. They are
read here with a restricted unpickler that rebuilds tensors and stand-in classes named like the classes the
``dall_e`` module tree is made of (``PICKLED_CLASSES``) and nothing else. A stand-in only stores the attribute
dict the pickle gives it; nothing of ``dall_e`` (nor of the modules' classes) is imported or run, so ``dall_e``
need not be installed. Legacy files are read by ``LegacyUnpickler`` (``find_class`` allows the stand-ins, torch's
tensor-rebuild functions, storage types, ``OrderedDict``, ``set`` and ``torch.device``); zip files (torch >= 1.6)
by ``torch.load(..., weights_only=True)`` with the stand-ins added by ``torch.serialization.safe_globals``. Any
other global in a file is refused with ``UnsafeFileError`` naming it, and nothing from the file runs.

Weights map one to one (``openai_names``): the ``dall_e`` convolutions hold ``w``, ``b`` where ours (plain
``nn.Conv2d``) hold ``weight``, ``bias``; ``blocks.input`` / ``blocks.group_<g>.block_<i>`` /
``blocks.output.conv`` are our ``net`` entries in order. The architecture is the same (paper appendix A):
7x7 input conv, ``group_count`` groups of ``n_blk_per_group`` residual blocks with post-gain
``1 / (group_count * n_blk_per_group)**2`` and bottleneck width ``n_out // 4``, 2x2 max-pool / nearest 2x
upsampling between groups, ReLU + 1x1 output conv; the decoder's 6 output channels are the logit-Laplace ``mu``
and ``ln b``; ``map_pixels`` uses eps 0.1. The released model is ``DVAEConfig.openai()``.

One difference in use, not in the weights: on CUDA the ``dall_e`` convolutions run in float16 (all but the
encoder's last and the decoder's first); ``DVAE`` computes in float32 (or the autocast dtype it runs under).
"""
from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
from collections import OrderedDict
from os import PathLike
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn as nn

from .common import UnsafeFileError, unpickling_refusal
from .safe_io import check_count, check_view

ENCODER_CLASS, DECODER_CLASS = "dall_e.encoder.Encoder", "dall_e.decoder.Decoder"
# Every class a torch.save of the dall_e encoder or decoder names (checked with
# torch.serialization.get_unsafe_globals_in_checkpoint on the package's modules).
PICKLED_CLASSES = (
    ENCODER_CLASS, "dall_e.encoder.EncoderBlock", DECODER_CLASS, "dall_e.decoder.DecoderBlock", "dall_e.utils.Conv2d",
    "torch.nn.modules.container.Sequential", "torch.nn.modules.activation.ReLU", "torch.nn.modules.linear.Identity",
    "torch.nn.modules.pooling.MaxPool2d", "torch.nn.modules.upsampling.Upsample",
)


class PickledModule:
    """Stand-in for a module class named in the pickle: keeps the attribute dict the pickle holds (``_modules``,
    ``_parameters``, the ``attrs`` fields) and does nothing else. ``pickled_name`` is the class it stands for."""

    pickled_name = ""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"{self.pickled_name}: expected an attribute dict, got {type(state).__name__}")
        self.__dict__.update(state)

    def __repr__(self):
        return f"<pickled {self.pickled_name}>"


STAND_INS = {name: type(name.rsplit(".", 1)[1], (PickledModule,), {"pickled_name": name, "__module__": __name__})
             for name in PICKLED_CLASSES}


LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.save's format before zip files (OpenAI's files are in it)


def _rebuild_tensor(storage, storage_offset, size, stride):
    """``torch._utils._rebuild_tensor`` after ``check_view``: the view must lie inside its storage (torch's
    ``set_`` would grow the storage with uninitialised memory, which then ends up in the weights)."""
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"a tensor rebuilt from a {type(storage).__name__}, expected a storage")
    check_view(None, "a tensor", size, stride, storage_offset, storage._size())
    return torch._utils._rebuild_tensor(storage, storage_offset, tuple(size), tuple(stride))


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None):
    """``torch._utils._rebuild_tensor_v2`` through ``_rebuild_tensor``; hooks and tensor metadata are refused
    (torch.save writes them empty)."""
    if backward_hooks or metadata:
        raise pickle.UnpicklingError("a tensor with backward hooks or Python attributes (torch.save writes none)")
    tensor = _rebuild_tensor(storage, storage_offset, size, stride)
    tensor.requires_grad = bool(requires_grad)
    return tensor


# What the legacy reader rebuilds besides the stand-ins: the callables torch.save's tensors and modules name
# (the tensor rebuilders checked against their storage)
LEGACY_GLOBALS = {
    "collections.OrderedDict": OrderedDict, "builtins.set": set, "torch.device": torch.device,
    "torch._utils._rebuild_tensor": _rebuild_tensor,
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": torch._utils._rebuild_parameter,
}


class LegacyUnpickler(pickle.Unpickler):
    """Reads the pickles of torch's legacy (pre-zip) format with ``find_class`` restricted to ``STAND_INS``,
    ``LEGACY_GLOBALS`` and torch's storage types (the ``pickle`` documentation's "restricting globals"): a
    file can only name those, so unpickling it runs nothing of the file's choosing. Storages are created empty
    here and filled by ``read_legacy`` from the bytes after the pickles."""

    def __init__(self, file, available: int = 0):
        super().__init__(file)
        self.storages: dict[str, torch.Tensor] = {}  # key -> flat tensor owning the storage
        self.file = file
        self.available = available  # bytes of the file: every storage together must fit in what is left
        self.claimed = 0

    def find_class(self, module, name):
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names (__builtin__.set)
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        if full in STAND_INS:
            return STAND_INS[full]
        if full in LEGACY_GLOBALS:
            return LEGACY_GLOBALS[full]
        if module == "torch" and name.endswith("Storage"):
            try:
                return torch.serialization.StorageType(name)  # a dtype holder (.dtype), nothing callable
            except (KeyError, AttributeError):
                pass
        raise pickle.UnpicklingError(f"Unsupported global: GLOBAL {full}")

    def persistent_load(self, pid):
        if not isinstance(pid, tuple) or not pid:
            raise pickle.UnpicklingError(f"unknown persistent id {pid!r}")
        if pid[0] == "module" and len(pid) == 4 and isinstance(pid[1], type) and issubclass(pid[1], PickledModule):
            return pid[1]  # the module's class (a stand-in); the source text saved with it is ignored
        if pid[0] == "storage" and len(pid) == 6 and isinstance(pid[1], torch.serialization.StorageType):
            storage_type, key, _location, numel, view = pid[1:]
            if not isinstance(key, str):
                raise pickle.UnpicklingError(f"storage key {key!r:.40} is not a string")
            if key not in self.storages:
                # checked before allocating: the storages' bytes follow the pickles, so together they fit there
                size = torch.empty((), dtype=storage_type.dtype).element_size()
                left = self.available - self.file.tell()
                numel = check_count(None, f"storage {key} size", numel, left // size, "elements")
                self.claimed += numel * size
                check_count(None, "the storages' total size", self.claimed, left)
                self.storages[key] = torch.empty(numel, dtype=storage_type.dtype)
            root = self.storages[key]
            untyped = root.untyped_storage()
            if view is not None:  # (view key, offset, size) in elements: a part of the root storage
                if not isinstance(view, tuple) or len(view) != 3:
                    raise pickle.UnpicklingError(f"storage {key}: view {view!r:.60} is not (key, offset, size)")
                _, offset, size = view
                offset = check_count(None, f"storage {key} view offset", offset, root.numel(), "elements",
                                     "its storage holds only")
                size = check_count(None, f"storage {key} view size", size, root.numel() - offset, "elements",
                                   "its storage holds only")
                untyped = untyped[offset * root.element_size(): (offset + size) * root.element_size()]
            return torch.storage.TypedStorage(wrap_storage=untyped, dtype=root.dtype, _internal=True)
        raise pickle.UnpicklingError(f"persistent id {pid[0]!r} is not a tensor storage or a dall_e module")


def read_legacy(f):
    """The object in a legacy-format ``torch.save`` file ``f`` (binary, at its start), with ``LegacyUnpickler``:
    magic number, protocol, system info, the object, the storage keys, then each storage as an int64 element
    count and its bytes (little-endian), the layout of ``torch.serialization._legacy_load``. Every size is
    checked against the file before anything is allocated for it (``dalle.safe_io``): the storages together must
    fit in the bytes after the pickles, each tensor inside its storage, and the storage list must name each storage
    once."""
    start = f.tell()
    end = f.seek(0, io.SEEK_END)  # every size the file states is checked against the bytes it holds
    f.seek(start)
    if LegacyUnpickler(f).load() != LEGACY_MAGIC:
        raise pickle.UnpicklingError("no torch.save magic number")
    LegacyUnpickler(f).load()  # protocol version
    info = LegacyUnpickler(f).load()
    if not isinstance(info, dict) or not info.get("little_endian", False):
        raise pickle.UnpicklingError("only little-endian torch files are read")
    main = LegacyUnpickler(f, end)
    obj = main.load()
    keys = LegacyUnpickler(f).load()
    if not isinstance(keys, list) or len(set(keys)) != len(keys) or set(keys) != set(main.storages):
        raise pickle.UnpicklingError(f"the storage list does not name each of the {len(main.storages)} storages "
                                     "once")
    for key in keys:
        flat = main.storages[key]
        count = int.from_bytes(f.read(8), "little")
        if count != flat.numel():
            raise pickle.UnpicklingError(f"storage {key} holds {count} elements, its tensors say {flat.numel()}")
        data = f.read(count * flat.element_size())
        if len(data) != flat.numel() * flat.element_size():
            raise pickle.UnpicklingError(f"storage {key} is truncated")
        flat.view(torch.uint8).copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return obj


def read_pickled_module(source):
    """The object in a ``torch.save`` file of a ``dall_e`` module (``source``: a path or a binary file object),
    read with the restricted unpickler described in the module docstring: the module tree comes back as
    ``PickledModule`` stand-ins holding tensors; a file holding a plain state dict comes back as that dict.
    Zip files (torch >= 1.6) are read by ``torch.load(weights_only=True)``, legacy files (OpenAI's) by
    ``read_legacy``; both refuse every global but the same allowlist.

    Raises ``FileNotFoundError`` for a missing path, ``UnsafeFileError`` (a ``ValueError``) naming the global
    the reader refused (nothing from the file runs), ``ValueError`` for a file that is not a torch file or whose
    sizes do not add up (naming the field)."""
    name = source if isinstance(source, (str, PathLike)) else getattr(source, "name", "the file")
    if isinstance(source, (str, PathLike)) and not Path(source).is_file():
        raise FileNotFoundError(f"no file {source}")
    f = open(source, "rb") if isinstance(source, (str, PathLike)) else source
    try:
        start = f.tell()
        zipped = f.read(4) == b"PK\x03\x04"
        f.seek(start)
        if not zipped:
            return read_legacy(f)
        with torch.serialization.safe_globals([(cls, full) for full, cls in STAND_INS.items()]):
            return torch.load(f, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, AttributeError, IndexError,
            OverflowError) as e:  # what a malformed pickle raises in the readers
        reason = unpickling_refusal(e)
        refused = re.search(r"GLOBAL (\S+)", reason)
        if refused is None:  # malformed, truncated or an opcode the reader does not know: not a torch file
            raise ValueError(f"{name} is not a torch file of the dall_e modules (the restricted reader stopped at: "
                             f"{reason}); nothing from the file was run") from None
        raise UnsafeFileError(f"{name} is refused: it names the global {refused.group(1)}, which is neither a "
                              "tensor nor a class of the dall_e module tree, and loading it could run code from the "
                              f"file; nothing from the file was run") from None
    except RuntimeError as e:  # the zip reader: not a torch file
        raise ValueError(f"{name} is not a torch file ({str(e).splitlines()[0]})") from None
    finally:
        if f is not source:
            f.close()


def class_name(module) -> str:
    """``module.class`` of a stand-in or of a real module (an ``nn.Module`` someone loaded)."""
    if isinstance(module, PickledModule):
        return module.pickled_name
    return f"{type(module).__module__}.{type(module).__qualname__}"


def _modules(module) -> "OrderedDict[str, object]":
    children = vars(module).get("_modules") if isinstance(module, (PickledModule, nn.Module)) else None
    if not isinstance(children, dict):
        raise ValueError(f"{class_name(module)} holds no submodules (not a module tree)")
    return children


def flat_state(module, prefix: str = "", _seen: dict | None = None) -> dict:
    """``state_dict()`` of a stand-in tree (or a real module tree): ``{dotted name: tensor}``. Every module is
    visited once: ``ValueError`` for a module that appears at two places of the tree (a crafted file can share
    one object many times per level, which a walk would visit exponentially often; ``dall_e`` trees share
    nothing), a tree deeper than the ``dall_e`` modules' 5 levels, or an entry that is not a tensor."""
    seen = {} if _seen is None else _seen
    if id(module) in seen:
        raise ValueError(f"{prefix[:-1] or 'the root'} is the module already at {seen[id(module)] or 'the root'}: "
                         "a module tree that shares submodules is not a dall_e module")
    seen[id(module)] = prefix[:-1]
    if prefix.count(".") > 8:
        raise ValueError(f"{prefix[:80]}...: module tree deeper than a dall_e module's")
    out = {}
    for k, v in (vars(module).get("_parameters") or {}).items():
        if v is not None:
            out[prefix + k] = v
    for k, v in (vars(module).get("_buffers") or {}).items():
        if v is not None and k not in (vars(module).get("_non_persistent_buffers_set") or ()):
            out[prefix + k] = v
    for k, child in _modules(module).items():
        if child is not None:
            out.update(flat_state(child, f"{prefix}{k}.", seen))
    bad = [k for k, v in out.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise ValueError(f"{bad[0]} is a {type(out[bad[0]]).__name__}, expected a tensor")
    return out


def _blocks(sd: dict, what: str) -> tuple[int, int]:
    """``(group_count, n_blk_per_group)`` from ``blocks.group_<g>.block_<i>.`` names; every group alike."""
    found: dict[int, set[int]] = {}
    for k in sd:
        m = re.match(r"blocks\.group_(\d+)\.block_(\d+)\.", k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    groups = sorted(found)
    if not groups or groups != list(range(1, len(groups) + 1)):
        raise ValueError(f"{what}: expected residual groups blocks.group_1 .. group_G, found {groups}")
    counts = {len(b) for b in found.values()}
    if len(counts) != 1 or any(sorted(b) != list(range(1, len(b) + 1)) for b in found.values()):
        raise ValueError(f"{what}: groups hold different blocks ({ {g: sorted(b) for g, b in found.items()} })")
    return len(groups), counts.pop()


def _shape(sd: dict, key: str, what: str) -> torch.Size:
    if key not in sd:
        raise ValueError(f"{what}: no weight {key!r} (found {sorted(sd)[:6]}...): not a dall_e module")
    return sd[key].shape


def openai_config(encoder_sd: dict, decoder_sd: dict, image_size: int = 256):
    """The sizes the two ``dall_e`` state dicts describe (read from the weight shapes): the fields of a
    ``DVAEConfig`` (``dalle.dvae``, which builds the model from them), as a ``SimpleNamespace``."""

    groups, blocks = _blocks(encoder_sd, "encoder")
    d_groups, d_blocks = _blocks(decoder_sd, "decoder")
    enc_in, dec_in = _shape(encoder_sd, "blocks.input.w", "encoder"), _shape(decoder_sd, "blocks.input.w", "decoder")
    enc_out = _shape(encoder_sd, "blocks.output.conv.w", "encoder")
    dec_out = _shape(decoder_sd, "blocks.output.conv.w", "decoder")
    cfg = SimpleNamespace(image_size=image_size, n_hid=enc_in[0], n_init=dec_in[0], vocab_size=enc_out[0],
                          group_count=groups, n_blk_per_group=blocks, input_channels=enc_in[1])
    theirs = dict(group_count=d_groups, n_blk_per_group=d_blocks, vocab_size=dec_in[1], n_hid=dec_out[1],
                  output_channels=dec_out[0])
    ours = dict(group_count=groups, n_blk_per_group=blocks, vocab_size=enc_out[0], n_hid=enc_in[0],
                output_channels=2 * enc_in[1])
    if theirs != ours:
        diff = {k: (ours[k], theirs[k]) for k in ours if ours[k] != theirs[k]}
        raise ValueError(f"the encoder and decoder are not one dVAE: (encoder's, decoder's) {diff}")
    return cfg


def openai_names(model) -> dict[str, str]:
    """``{dall_e name: our name}`` for every weight of ``model`` (a ``DVAE``): the one-to-one map. The residual
    blocks are the entries of ``net`` with a ``res_path``."""

    names = {}
    for part, coder, first in (("encoder", model.encoder, "net.0"), ("decoder", model.decoder, "input")):
        convs = {"blocks.input": f"{part}.{first}", "blocks.output.conv": f"{part}.net.{len(coder.net) - 1}"}
        blocks = [i for i, m in enumerate(coder.net) if isinstance(getattr(m, "res_path", None), nn.Sequential)]
        for j, i in enumerate(blocks):
            g, b = divmod(j, model.cfg.n_blk_per_group)
            theirs, ours = f"blocks.group_{g + 1}.block_{b + 1}", f"{part}.net.{i}"
            if isinstance(coder.net[i].id_path, nn.Conv2d):
                convs[f"{theirs}.id_path"] = f"{ours}.id_path"
            for k in range(4):  # res_path: ReLU, conv, ReLU, conv, ...: convs at 1, 3, 5, 7
                convs[f"{theirs}.res_path.conv_{k + 1}"] = f"{ours}.res_path.{2 * k + 1}"
        for t, o in convs.items():
            names[f"{part}:{t}.w"], names[f"{part}:{t}.b"] = f"{o}.weight", f"{o}.bias"
    return names


def _check_layout(module, cfg, part: str) -> None:
    """The non-weight structure of a ``dall_e`` module tree: the pooling / upsampling between groups and the
    blocks' post-gain (a state dict has neither; only a module tree is checked)."""
    n_layers = cfg.group_count * cfg.n_blk_per_group
    top = _modules(module).get("blocks")
    groups = _modules(top) if top is not None else {}
    want = ("pool", "torch.nn.modules.pooling.MaxPool2d") if part == "encoder" else \
        ("upsample", "torch.nn.modules.upsampling.Upsample")
    for g in range(1, cfg.group_count + 1):
        members = _modules(groups[f"group_{g}"])
        between = members.get(want[0])
        if (between is None) != (g == cfg.group_count):
            raise ValueError(f"{part}: group_{g} {'has' if between is not None else 'lacks'} a {want[0]} layer")
        if between is not None:
            a = vars(between)
            ok = class_name(between) == want[1] and (
                a.get("kernel_size") in (2, (2, 2)) and a.get("stride") in (None, 2, (2, 2)) and not a.get("padding")
                if part == "encoder" else a.get("scale_factor") in (2, 2.0, (2.0, 2.0)) and a.get("mode") == "nearest")
            if not ok:
                raise ValueError(f"{part}: group_{g}.{want[0]} is not a 2x {want[0]} ({class_name(between)}, "
                                 f"{ {k: a.get(k) for k in ('kernel_size', 'stride', 'scale_factor', 'mode')} })")
        for b in range(1, cfg.n_blk_per_group + 1):
            gain = vars(members[f"block_{b}"]).get("post_gain")
            if gain is None or abs(gain - 1 / n_layers**2) > 1e-12:
                raise ValueError(f"{part}: group_{g}.block_{b} has post_gain {gain!r}, expected 1/{n_layers}**2")


def _check_storage(sd: dict, where: str) -> None:
    """``ValueError`` naming ``where`` unless the weights' bytes fit in their distinct storages: a file can rebuild
    many weights (or one of stride 0) from one small storage, and copying them out would then take memory far
    beyond the file's size (the released files give every weight its own storage)."""
    held = {}
    for t in sd.values():
        st = t.untyped_storage()
        held[st.data_ptr()] = max(held.get(st.data_ptr(), 0), st.nbytes())
    check_count(where, "the weights' total size", sum(t.numel() * t.element_size() for t in sd.values()),
                sum(held.values()), "bytes", "their storages hold only")


def _as_state(source, part: str, expected: str):
    """``(state dict, module tree or None)`` of a path / file object / module / state dict."""
    is_file = isinstance(source, (str, PathLike, io.IOBase))
    obj = read_pickled_module(source) if is_file else source
    where = f"{part} ({source if isinstance(source, (str, PathLike)) else getattr(source, 'name', source)})" \
        if is_file else part
    if isinstance(obj, dict):
        if not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
            raise ValueError(f"{where}: holds a dict that is not a state dict (names to tensors)")
        _check_storage(obj, where)
        return dict(obj), None
    if not isinstance(obj, (PickledModule, nn.Module)):
        kind = TypeError if not is_file else ValueError
        raise kind(f"{where} must be the released {part}.pkl, a dall_e module or its state dict, got a "
                   f"{type(obj).__name__}")
    if class_name(obj) != expected:
        raise ValueError(f"{where} holds a {class_name(obj)}, expected a {expected} (OpenAI's {part}.pkl)")
    try:
        sd = flat_state(obj)
    except ValueError as e:  # named after the file it came from
        raise ValueError(f"{where}: {e}") from None
    _check_storage(sd, where)
    return sd, obj


def load_openai(encoder, decoder, build, image_size: int = 256):
    """The model ``build(sizes)`` returns (``DVAE.from_openai`` builds a ``DVAE`` from ``openai_config``'s sizes)
    with the weights of OpenAI's released dVAE, in eval mode on the CPU; see ``DVAE.from_openai``."""

    enc_sd, enc_tree = _as_state(encoder, "encoder", ENCODER_CLASS)
    dec_sd, dec_tree = _as_state(decoder, "decoder", DECODER_CLASS)
    cfg = openai_config(enc_sd, dec_sd, image_size)
    for tree, part in ((enc_tree, "encoder"), (dec_tree, "decoder")):
        if tree is not None:
            _check_layout(tree, cfg, part)
    with torch.device("meta"):  # shapes only: every weight is replaced below, so none is drawn
        model = build(cfg)
    names = openai_names(model)
    given = {f"encoder:{k}": v for k, v in enc_sd.items()} | {f"decoder:{k}": v for k, v in dec_sd.items()}
    missing, unexpected = sorted(names.keys() - given.keys()), sorted(given.keys() - names.keys())
    if missing or unexpected:
        raise ValueError(f"the weights do not match the dall_e dVAE layout: missing {missing[:6]}, unexpected "
                         f"{unexpected[:6]}")
    ours = model.state_dict()
    state = {}
    for theirs, name in names.items():
        t = given[theirs]
        if t.shape != ours[name].shape:
            raise ValueError(f"{theirs.replace(':', ' ')} has shape {tuple(t.shape)}, expected "
                             f"{tuple(ours[name].shape)} for the dVAE its other weights describe")
        if not t.is_floating_point():
            raise ValueError(f"{theirs.replace(':', ' ')} is {t.dtype}, expected floating point")
        state[name] = t.detach().to("cpu", torch.float32, copy=True)  # never shares memory with the source
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()
