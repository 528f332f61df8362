"""Model files from anyone (issue #28): every file here is built in the test. A crafted file ends in a one-line
error naming the file and the field, after work linear in its size: the OpenAI ``.pkl`` readers (legacy and zip)
in a child process under a time limit with its peak memory measured, the model folders of ``DVAE.load`` and
``Reranker.load`` against configs that ask for more than their weights hold."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from dalle.dvae import DVAE, DVAEConfig
from dalle.openai_dvae import read_pickled_module
from dalle.rerank import Reranker, RerankerConfig
from dalle.safe_io import check_count, check_view

ROOT = Path(__file__).resolve().parents[1]
CHILD_SECONDS = 60  # the child's whole run: importing torch and reading every crafted file
CHILD_MAX_RSS_MB = 1024  # its peak resident memory (torch's import is about 300 MB)

# Written by the child below (and importable by the test process for the in-process cases).
WRITER = r'''
import pickle, sys, types
from collections import OrderedDict
import torch

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


def fake_class(full):
    """A class that pickles as the global ``full`` (a dall_e class name), through a stand-in module."""
    module, name = full.rsplit(".", 1)
    parts = module.split(".")
    for i in range(1, len(parts) + 1):
        sys.modules.setdefault(".".join(parts[:i]), types.ModuleType(".".join(parts[:i])))
    cls = type(name, (), {"__module__": module, "__qualname__": name})
    setattr(sys.modules[module], name, cls)
    return cls


def node(full, modules=(), params=()):
    obj = CLASSES[full]()
    obj.__dict__.update(_parameters=OrderedDict(params), _buffers=OrderedDict(), _modules=OrderedDict(modules))
    return obj


CLASSES = {}  # filled by crafted(): the stand-in modules exist only in the child


def shared_tree(depth, fanout):
    """An Encoder whose every level holds ``fanout`` references to one child: a file of about a kilobyte whose
    tree has fanout**depth paths, all within the depth of a dall_e module."""
    child = node("torch.nn.modules.container.Sequential")
    for _ in range(depth):
        child = node("torch.nn.modules.container.Sequential", [(str(i), child) for i in range(fanout)])
    return node("dall_e.encoder.Encoder", [("blocks", child)])


class Storage:
    def __init__(self, key, numel, data=b""):
        self.key, self.numel, self.data = key, numel, data


class Tensor:
    """Pickles as torch's legacy tensor record: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, size, stride, False, OrderedDict())

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, self.args


def write_legacy(path, obj):
    """torch.save's legacy (pre-zip) layout: magic, protocol, system info, the object (storages as persistent
    ids), the storage keys, then each storage as an int64 element count and its bytes."""
    storages = {}

    class Pickler(pickle.Pickler):
        def persistent_id(self, o):
            if isinstance(o, Storage):
                storages[o.key] = o
                return ("storage", torch.FloatStorage, o.key, "cpu", o.numel, None)
            return None

    with open(path, "wb") as f:
        for header in (LEGACY_MAGIC, 1001, dict(protocol_version=1001, little_endian=True,
                                                type_sizes=dict(short=2, int=4, long=4))):
            pickle.dump(header, f, protocol=2)
        Pickler(f, protocol=2).dump(obj)
        pickle.dump(sorted(storages), f, protocol=2)
        for key in sorted(storages):
            s = storages[key]
            f.write(len(s.data).__floordiv__(4).to_bytes(8, "little") + s.data)
    return path


def crafted(folder):
    """{name: path} of every crafted file."""
    CLASSES.update({n: fake_class(n) for n in ("dall_e.encoder.Encoder", "torch.nn.modules.container.Sequential")})
    four = Storage("0", 4, bytes(16))
    files = {
        "shared_legacy": write_legacy(folder / "shared_legacy.pkl", shared_tree(7, 16)),
        "tensor_past_storage": write_legacy(folder / "tensor_past_storage.pkl",
                                            {"blocks.input.w": Tensor(four, 0, (1000,), (1,))}),
        "offset_past_storage": write_legacy(folder / "offset_past_storage.pkl",
                                            {"blocks.input.w": Tensor(four, 3, (2,), (1,))}),
        "huge_storage": write_legacy(folder / "huge_storage.pkl",
                                     {"blocks.input.w": Tensor(Storage("0", 10**12, bytes(16)), 0, (4,), (1,))}),
        "negative_stride": write_legacy(folder / "negative_stride.pkl",
                                        {"blocks.input.w": Tensor(four, 3, (4,), (-1,))}),
        "stride_zero": write_legacy(folder / "stride_zero.pkl",
                                    {"blocks.input.w": Tensor(four, 0, (10**6, 10**6), (0, 0))}),
        "shared_storage": write_legacy(folder / "shared_storage.pkl",
                                       {f"blocks.group_1.block_{i}.w": Tensor(four, 0, (4,), (1,))
                                        for i in range(1, 1001)}),
    }
    torch.save(shared_tree(7, 16), folder / "shared_zip.pkl")
    files["shared_zip"] = folder / "shared_zip.pkl"
    # the zip format (torch >= 1.6) with a real 4-element storage: a view past it, one of stride 0
    real = torch.zeros(4).untyped_storage()
    real = torch.storage.TypedStorage(wrap_storage=real, dtype=torch.float32, _internal=True)
    for name, size, stride in (("zip_past_storage", (1000,), (1,)), ("zip_stride_zero", (10**6, 10**6), (0, 0))):
        torch.save({"blocks.input.w": Tensor(real, 0, size, stride)}, folder / f"{name}.pkl")
        files[name] = folder / f"{name}.pkl"
    return files
'''

CHILD = r'''
import json, sys, time
from pathlib import Path
sys.path[:0] = [ROOT, ROOT + "/python"]
exec(WRITER)
files = crafted(Path(FOLDER))
for mod in [m for m in sys.modules if m == "dall_e" or m.startswith("dall_e.")]:
    del sys.modules[mod]  # the reader must not need (or find) the classes the file names
from dalle.dvae import DVAE
from dalle.convert import main as convert_main
for name, path in files.items():
    start = time.perf_counter()
    try:
        if name == "shared_zip":  # the command line, once
            try:
                convert_main(["--openai-dvae", str(path), str(path), "--out", FOLDER + "/out"])
                result = "accepted"
            except SystemExit as e:
                result = f"exit {e.code}"
        else:
            DVAE.from_openai(path, path)
            result = "accepted"
    except Exception as e:
        result = f"{type(e).__name__}: {e}"
    print(json.dumps([name, result, time.perf_counter() - start]), flush=True)
# peak resident memory of this process since its exec (VmHWM; ru_maxrss would also count the parent's pages
# while the child was being forked)
peak = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")]
print(json.dumps(["peak_kb", int(peak[0]), 0]), flush=True)
'''


def run_child(folder: Path):
    """Run ``CHILD`` with a wall-clock limit; returns (its result lines, its stderr, seconds, its peak RSS in MB,
    which the child reads from /proc/self/status)."""
    code = f"ROOT = {str(ROOT)!r}\nFOLDER = {str(folder)!r}\nWRITER = {WRITER!r}\n" + CHILD
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    with open(folder / "out.txt", "w") as out, open(folder / "err.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=err, env=env)
    try:
        proc.wait(timeout=CHILD_SECONDS)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"the crafted files took more than {CHILD_SECONDS} s; results so far: "
                    f"{(folder / 'out.txt').read_text()}")
    seconds = time.monotonic() - start
    err = (folder / "err.txt").read_text()
    assert proc.returncode == 0, err
    lines = [json.loads(line) for line in (folder / "out.txt").read_text().splitlines()]
    peak = [kb for name, kb, _ in lines if name == "peak_kb"]
    assert len(peak) == 1, lines
    return [line for line in lines if line[0] != "peak_kb"], err, seconds, peak[0] / 1024


def test_crafted_pickles_are_refused_in_linear_time_and_memory(tmp_path):
    """A 1.8 KB pickle sharing one module 16 times per level ran for many minutes (the walk revisited shared
    subtrees); a tensor larger than its storage was accepted with the storage grown by uninitialised memory; a
    storage of 10**12 elements was allocated before its bytes were read; weights rebuilt from one small storage
    (shared, or of stride 0) were copied out to far more memory than the file holds. Each is now a one-line
    ValueError."""
    lines, err, seconds, rss_mb = run_child(tmp_path)
    got = {name: (result, t) for name, result, t in lines}
    assert os.path.getsize(tmp_path / "shared_legacy.pkl") < 2048
    expected = {
        "shared_legacy": r"^ValueError: encoder \(.*shared_legacy.pkl\): blocks(\.0)*\.1 is the module already at "
                         r"blocks(\.0)+: a module tree that shares submodules is not a dall_e module$",
        "tensor_past_storage": r"ValueError: .*tensor_past_storage.pkl is not a torch file of the dall_e modules "
                               r"\(the restricted reader stopped at: a tensor of shape \(1000,\), stride \(1,\) at "
                               r"offset 0 needs 1000 elements but its storage holds 4\); nothing from the file "
                               r"was run$",
        "offset_past_storage": r"offset_past_storage.pkl is not a torch file .*offset 3 needs 5 elements but its "
                               r"storage holds 4\)",
        "huge_storage": r"huge_storage.pkl is not a torch file .*storage 0 size is 1000000000000 elements but the "
                        r"file holds only \d+\)",
        "negative_stride": r"negative_stride.pkl is not a torch file .*stride \(-1,\) for shape \(4,\), expected 1 "
                           r"non-negative ints\)",
        "stride_zero": r"^ValueError: encoder \(.*stride_zero.pkl\): the weights' total size is 4000000000000 "
                       r"bytes but their storages hold only 16$",
        "shared_storage": r"^ValueError: encoder \(.*shared_storage.pkl\): the weights' total size is 16000 bytes "
                          r"but their storages hold only 16$",
        "zip_past_storage": r"^ValueError: .*zip_past_storage.pkl is not a torch file \(Trying to resize storage that "
                            r"is not resizable\)$",
        "zip_stride_zero": r"^ValueError: encoder \(.*zip_stride_zero.pkl\): the weights' total size is 4000000000000 "
                           r"bytes but their storages hold only 16$",
        "shared_zip": r"^exit 2$",
    }
    for name, pattern in expected.items():
        result, t = got[name]
        assert re.search(pattern, result), (name, result)
        assert "\n" not in result
    assert re.search(r"^python -m dalle.convert: error: encoder \(.*shared_zip.pkl\): blocks(\.0)*\.1 is the module "
                     r"already at blocks(\.0)+: a module tree that shares submodules is not a dall_e module$", err,
                     re.M), err
    assert seconds < CHILD_SECONDS and rss_mb < CHILD_MAX_RSS_MB, (seconds, rss_mb)


def test_in_range_views_still_read(tmp_path):
    """The checks refuse only what does not fit: a view inside its storage reads its own elements."""
    ns = {}
    exec(WRITER, ns)
    data = torch.arange(6, dtype=torch.float32).numpy().tobytes()
    path = ns["write_legacy"](tmp_path / "ok.pkl", {"w": ns["Tensor"](ns["Storage"]("0", 6, data), 1, (2, 2),
                                                                     (1, 2))})
    got = read_pickled_module(path)["w"]
    assert torch.equal(got, torch.tensor([[1.0, 3.0], [2.0, 4.0]]))


def test_size_rule():
    with pytest.raises(ValueError, match=r"^f.pt: count is 9 bytes but the file holds only 8$"):
        check_count("f.pt", "count", 9, 8)
    with pytest.raises(ValueError, match=r"^f.pt: count is True, expected a non-negative int$"):
        check_count("f.pt", "count", True, 8)
    assert check_count("f.pt", "count", 8, 8) == 8
    check_view("f", "t", (2, 3), (3, 1), 0, 6)
    check_view("f", "t", (0, 5), (5, 1), 6, 6)
    with pytest.raises(ValueError, match="needs 7 elements but its storage holds 6"):
        check_view("f", "t", (2, 3), (3, 1), 1, 6)


def small_dvae_folder(tmp_path) -> Path:
    folder = tmp_path / "dvae"
    DVAE(DVAEConfig.tiny(n_hid=8, n_init=8, vocab_size=16)).save(folder)
    return folder


@pytest.mark.parametrize("change,message", [
    ({"n_hid": 200_000, "vocab_size": 1 << 19}, (r"encoder.net.0.weight has shape \(8, 3, 7, 7\), the config "
                                                r"describes \(200000, 3, 7, 7\)$")),
    ({"n_blk_per_group": 10**9}, (r"the config's 3 x 1000000000 residual blocks per coder need at least "
                                  r"48000000000 tensors, the weights hold 66$")),
    ({"vocab_size": 17}, r"encoder.net.7.weight has shape \(16, 32, 1, 1\), the config describes \(17, 32, 1, 1\)$"),
])
def test_dvae_config_asking_for_more_than_the_weights(tmp_path, change, message):
    """A 56 KB folder whose config asked for 39 billion parameters ended in an allocator error: the config is
    compared with the weights on the meta device first."""
    folder = small_dvae_folder(tmp_path)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError, match=rf"^{folder}: the config and the weights disagree: {message}"):
        DVAE.load(folder)


def rewrite_tensor(weights: Path, name: str, fn):
    from safetensors.torch import load_file, save_file

    sd = load_file(weights)
    sd[name] = fn(sd[name])
    save_file(sd, weights)


def test_integer_weights_where_floats_belong_are_refused(tmp_path):
    folder = small_dvae_folder(tmp_path)
    assert DVAE.load(folder).encoder.net[0].weight.dtype == torch.float32
    rewrite_tensor(folder / "model.safetensors", "encoder.net.0.weight", lambda t: t.to(torch.int32))
    with pytest.raises(ValueError, match=rf"^{folder}: encoder.net.0.weight is torch.int32, expected a "
                                         "floating-point dtype$"):
        DVAE.load(folder)


def test_reranker_config_and_weights_are_compared_first(tmp_path):
    folder = tmp_path / "rr"
    Reranker(RerankerConfig(text_vocab=20, image_size=16, width=8, channels=(4, 8), colour_channels=4)).save(folder)
    assert Reranker.load(folder).cfg.width == 8
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "text_vocab": 10**9, "width": 4096}))
    with pytest.raises(ValueError, match=rf"^{folder}: the config and the weights disagree: token_emb has shape "):
        Reranker.load(folder)
    (folder / "config.json").write_text(json.dumps({**config, "channels": [4] * 10**5, "image_size": 2**17}))
    with pytest.raises(ValueError, match=rf"^{folder}: the config and the weights disagree: 100000 convolutions"):
        Reranker.load(folder)
    (folder / "config.json").write_text(json.dumps(config))
    rewrite_tensor(folder / "model.safetensors", "image_proj.weight", lambda t: t.to(torch.int64))
    with pytest.raises(ValueError, match=rf"^{folder}: image_proj.weight is torch.int64, expected a floating"):
        Reranker.load(folder)
