"""What the command-line tools share: a parser whose errors are one line, argument types that check ranges, and
the files a trained run folder must hold.

Every tool checks all of its arguments before any work starts (nothing trained, no folder created) and reports
a bad one as a usage error: one line on stderr naming the flag and what it accepts, exit status 2, no
traceback. Range checks are argparse ``type=`` functions (they name the flag through argparse); checks that
need two flags or the run folder call ``parser.error``.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import os
import sys
from pathlib import Path

from dalle_kernels._cli import Parser, int_at_least, positive_int  # noqa: F401 - shared with dalle_kernels
from dalle_kernels.ops.attention import ATTENTION_BACKENDS as ATTN_BACKENDS  # noqa: F401 - sparse_attention's

from .checkpoint import CHECKPOINT_DIR, has_checkpoints, newest_verified
from .common import convert_hint, pretrained_files
from .dvae import DVAE, MODEL_TYPE
from .runs import LEGACY_CHECKPOINT

# The files a trained transformer run folder must hold, by role; any one name of a role will do.
# The loaders (dalle.runs.load_run_model, dalle.tokenizer.CaptionTokenizer.load, dalle.runs.run_dvae_path)
# read these; change this table with them.
RUN_FILES = {
    "model": ("model.safetensors", "dcp"),  # the final weights, else the newest training checkpoint (RUN/dcp)
    "tokenizer": ("tokenizer.json",),
}
OLD_RUN_MODEL = "dalle.pt"  # an earlier version's model file: named with the conversion command, never read
# Where a run looks for its dVAE when the model file's recorded path is gone (the run folder was moved).
RUN_DVAE_FILES = ("dvae/model.safetensors",)
RERANKER_FILE = "reranker"  # the run's reranker folder (model.safetensors + config.json)


# ------------------------------------------------------------------------------------------------ options
def option(default, kind, help: str, flags: tuple = (), parse_only: bool = False, required: bool = False):
    """A config field declared once: its ``default``, the values it takes (``kind``: a tuple of choices, an
    argparse type function such as ``positive_int``, or None for an on/off flag) and its ``help``. ``add_options``
    makes every such field a flag and ``check_options`` checks a config built in Python by the same rule.
    ``flags``: more names for the flag (``--run-dir``, which torchrun leaves alone); ``parse_only``: ``kind``
    checks the command line only (it looks at files: a config built in Python may name one made later);
    ``required``: the command line must give it (a config built in Python has ``default``)."""
    return dataclasses.field(default=default, metadata={"kind": kind, "help": help, "flags": tuple(flags),
                                                        "parse_only": parse_only, "required": required})


def add_options(parser, config_cls, only=None, defaults=None, flags=None, helps=None) -> None:
    """A flag for every field of the dataclass ``config_cls`` declared with ``option``: ``--name-with-dashes``
    (on/off fields: ``--name`` / ``--no-name``), its default, its check and its help. A command that runs a
    trainer (the pipeline) takes ``only`` some fields, with its own ``defaults``, flag names (``flags``: field ->
    flag; the value goes to ``args.<flag without dashes>``) and help sentences (``helps``)."""
    defaults, flags, helps = defaults or {}, flags or {}, helps or {}
    for f in dataclasses.fields(config_cls):
        if only is not None and f.name not in only:
            continue
        kind = f.metadata["kind"]
        help_ = helps.get(f.name, f.metadata["help"])
        names = [flags[f.name]] if f.name in flags else ["--" + f.name.replace("_", "-"), *f.metadata["flags"]]
        dest = names[0][2:].replace("-", "_")
        default = defaults.get(f.name, f.default)
        if kind is None:
            parser.add_argument(*names, dest=dest, action=argparse.BooleanOptionalAction, default=default,
                                help=help_)
            continue
        required = default is dataclasses.MISSING or f.metadata.get("required", False)
        parser.add_argument(*names, dest=dest, default=None if required else default, required=required,
                            help=help_, **kind_kwargs(kind))


def options_of(args, config_cls) -> dict:
    """The values of ``config_cls``'s fields in parsed ``args``."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(config_cls)}


def check_options(config) -> None:
    """``ValueError`` naming the first field of the dataclass ``config`` whose value its ``option`` kind refuses
    (None stands for a default that the config resolves itself and is not checked)."""
    for f in dataclasses.fields(config):
        kind, value = f.metadata.get("kind"), getattr(config, f.name)
        if (value is None and f.default is None) or f.metadata.get("parse_only"):
            continue
        if kind is None:
            if not isinstance(value, bool):
                raise ValueError(f"{f.name} must be True or False, got {value!r}")
            continue
        if isinstance(kind, tuple):
            if value not in kind:
                raise ValueError(f"{f.name} must be one of {kind}, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{f.name}: expected {kind.__name__}, got {value!r}")
        try:
            kind(str(value))
        except argparse.ArgumentTypeError as e:
            raise ValueError(f"{f.name}: {e}") from None


THREADS_HELP = ("torch CPU threads (0: torch's default); on a CPU whose cores are busy with other work, 1 can be "
                "several times faster")


def threads_option():
    """The ``threads`` field of a trainer's config (``--threads``): one declaration for every command."""
    return option(0, nonneg_int, THREADS_HELP)


# The 1-minute load average at or above which the cores count as busy with other work (before our run starts).
BUSY_LOAD = 0.5


def thread_advice(threads: int, load: float | None) -> str | None:
    """The one-line note for a CPU run on ``threads`` torch threads while the machine's 1-minute load average is
    ``load`` (None: unknown), or None when there is nothing to say (one thread, or idle cores). Advice only:
    the thread count stays what the command line says, so a run's arithmetic never depends on the load."""
    if threads <= 1 or load is None or load < BUSY_LOAD:
        return None
    return (f"note: torch uses {threads} CPU threads while other work is running on this machine (load "
            f"{load:.1f}); with busy cores one thread can be several times faster: --threads 1")


def advise_threads(device_text: str, threads: int = 0) -> None:
    """Print ``thread_advice`` on stderr, at the start of a command, for a run on ``device_text`` (``auto``,
    ``cpu``, ``cuda[:N]``) when it runs on the CPU, with ``threads`` torch threads (0: as torch is set now)."""
    if device_is_cuda(device_text):
        return
    import torch

    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # no load average on this system (Windows)
        load = None
    note = thread_advice(threads or torch.get_num_threads(), load)
    if note:
        print(note, file=sys.stderr)


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run the block with ``threads`` torch CPU threads (0: as they are), then set them back."""
    import torch

    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def warn_untrained_guidance(guidance: float, train_config: dict, run: str = "the transformer") -> None:
    """A warning line when ``--guidance`` steers away from the empty caption of a run trained without
    ``--cond-dropout`` (its empty-caption logits were never trained)."""
    if guidance != 1.0 and not train_config.get("cond_dropout", 0.0):
        warn(f"--guidance {guidance:g}: {run} was trained without caption dropout (--cond-dropout), so its "
             "empty-caption logits were never trained")


def warn(message: str) -> None:
    """One line on stderr for a flag that does nothing for the run at hand."""
    print(f"warning: {message}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ value types
nonneg_int = int_at_least(0)


def float_in(low=None, high=None, low_open=False, high_open=False):
    """argparse type: a finite float in the interval given (``None``: unbounded on that side)."""
    lo = "" if low is None else ("(" if low_open else "[") + f"{low:g}"
    hi = "" if high is None else f"{high:g}" + (")" if high_open else "]")
    want = (f"a number in {lo}, {hi}" if low is not None and high is not None else
            f"a number {'>' if low_open else '>='} {low:g}" if low is not None else
            f"a number {'<' if high_open else '<='} {high:g}" if high is not None else "a finite number")

    def check(text):
        try:
            v = float(text)
        except ValueError:
            v = math.nan
        below = low is not None and (v < low or (low_open and v == low))
        above = high is not None and (v > high or (high_open and v == high))
        if not math.isfinite(v) or below or above:  # nan and inf are never what a flag means
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    check.__name__ = want
    return check


finite_float = float_in()
positive_float = float_in(0.0, low_open=True)
nonneg_float = float_in(0.0)
probability = float_in(0.0, 1.0, high_open=True)  # a share of samples: [0, 1)


def existing_file(text: str) -> str:
    """argparse type: a path to an existing file."""
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file: {text!r}" if not Path(text).exists()
                                         else f"{text!r} is not a file")
    return text


def output_dir(text: str) -> str:
    """argparse type: a folder to write into (created later, by the work); not an existing file."""
    if not text:
        raise argparse.ArgumentTypeError("expected a folder path, got ''")
    if Path(text).exists() and not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} exists and is not a folder")
    return text


DEVICE_HELP = "auto (CUDA when available), cpu, cuda or cuda:N"


def kind_kwargs(kind) -> dict:
    """``add_argument`` keywords for a flag whose values are ``kind``: a tuple of choices or a type function."""
    return {"choices": kind} if isinstance(kind, tuple) else {"type": kind}


def device(text: str) -> str:
    """argparse type: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``, checked against this machine."""
    import torch

    if text == "auto":
        return text
    try:
        d = torch.device(text)
    except (RuntimeError, ValueError):
        d = None
    if d is None or d.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    if d.type == "cuda":
        if not torch.cuda.is_available():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has no CUDA device that PyTorch can use "
                                             "(use cpu or auto)")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {torch.cuda.device_count()} CUDA "
                                             f"device(s), numbered from 0")
    return text


def device_is_cuda(text: str) -> bool:
    """Whether a ``device`` value runs on CUDA (``auto``: when this machine has CUDA)."""
    import torch

    return text.startswith("cuda") or (text == "auto" and torch.cuda.is_available())


def check_precision(parser, precision: str, device_text: str) -> None:
    """``--precision bf16/fp16`` only means something on CUDA (on the CPU the run is fp32)."""
    if precision in ("bf16", "fp16") and not device_is_cuda(device_text):
        parser.error(f"argument --precision: {precision} needs a CUDA device; on the CPU training runs in fp32 "
                     f"(use --precision fp32 or auto)")


# ------------------------------------------------------------------------------------------------ run folders
def has_reranker(run) -> bool:
    """The run folder holds a trained reranker (``RUN/reranker/model.safetensors``)."""
    return (Path(run) / RERANKER_FILE / "model.safetensors").is_file()


def check_resume(parser, *runs) -> None:
    """``--resume`` needs a training checkpoint in one of the ``runs`` folders (``RUN/dcp``; which one verifies
    is the trainer's check), else a usage error; an earlier version's ``checkpoint.pt`` names the conversion."""
    if any(has_checkpoints(r) for r in runs):
        return
    for r in runs:
        if (Path(r) / LEGACY_CHECKPOINT).is_file():
            parser.error(f"argument --resume: {Path(r) / LEGACY_CHECKPOINT} is a checkpoint of an earlier version "
                         f"of dalle; {convert_hint(r, trust=True)}")
    looked = " or ".join(str(Path(r) / CHECKPOINT_DIR) for r in runs)
    parser.error(f"argument --resume: nothing to resume: no checkpoint in {looked}")



def verified_checkpoint(parser, run) -> Path:
    """``--resume`` of a trainer: the newest checkpoint of ``run`` that verifies (``checkpoint.newest_verified``),
    else a usage error naming each checkpoint and why it does not verify, or the conversion of an earlier
    version's ``checkpoint.pt``."""
    run = Path(run)
    folder, skipped = newest_verified(run)
    if folder is not None:
        return folder
    if not skipped and (run / LEGACY_CHECKPOINT).is_file():
        parser.error(f"argument --resume: {run / LEGACY_CHECKPOINT} is a checkpoint of an earlier version of dalle; "
                     f"{convert_hint(run, trust=True)}")
    why = "; ".join(f"{f.name}: {w}" for f, w in skipped)
    parser.error(f"argument --resume: nothing to resume: no checkpoint in {run / CHECKPOINT_DIR} verifies"
                 + (f" ({why})" if why else ""))


def check_run(parser, run: str, flag: str = "--run") -> Path:
    """A trained transformer run folder with every file of ``RUN_FILES``, else a usage error listing them."""
    path = Path(run)
    if not path.is_dir():
        parser.error(f"argument {flag}: no run folder {run!r} (a trained run holds "
                     f"{_files_wanted(path)}; train one with python -m dalle.pipeline or dalle.train)")
    missing = [names for names in RUN_FILES.values() if not any((path / n).exists() for n in names)]
    if RUN_FILES["model"] in missing and (path / OLD_RUN_MODEL).is_file():
        parser.error(f"argument {flag}: {run!r} holds a model of an earlier version of dalle "
                     f"({path / OLD_RUN_MODEL}, a torch pickle, which is no longer read): "
                     f"{convert_hint(path, trust=False)}")
    if missing:
        parser.error(f"argument {flag}: {run!r} is not a trained run: looked for {_files_wanted(path)}; "
                     f"missing {', '.join(' or '.join(str(path / n) for n in names) for names in missing)}")
    return path


def _files_wanted(path: Path) -> str:
    return ", ".join(" or ".join(str(path / n) for n in names) for names in RUN_FILES.values())


def run_load_failed(parser, run, exc: Exception, flag: str = "--run"):
    """Usage error for a run folder whose files ``check_run`` found but whose loading failed: a file missing
    (the dVAE: the path its model file records, else one of ``RUN_DVAE_FILES`` in the run folder), or one that
    is not what it should be (an earlier version's, not safetensors, another kind of model, another dVAE)."""
    where = ""
    if isinstance(exc, FileNotFoundError):
        also = " or ".join(str(Path(run) / n) for n in RUN_DVAE_FILES)
        where = f" (a run's dVAE is the one its model file records, else {also})"
    parser.error(f"argument {flag}: {run!r} cannot be loaded: {exc}{where}")


# ------------------------------------------------------------------------------------------------ attention
def check_dvae(parser, path, flag: str = "--dvae") -> Path:
    """The weights file of the dVAE folder ``path`` (or a file in it), after checking that it exists and that its
    ``config.json`` says ``model_type`` ``dalle_dvae`` and that it loads (``DVAE.load``: config and weights checked
    against each other); otherwise a usage error naming ``flag``."""
    import json

    try:
        weights, config = pretrained_files(path)
    except (FileNotFoundError, ValueError) as e:  # UnsafeFileError (an old torch file) is a ValueError
        parser.error(f"argument {flag}: {e}")
    if not weights.is_file():
        parser.error(f"argument {flag}: no dVAE: {str(path)!r} holds no {weights.name} (looked for {weights}; "
                     f"train one: python -m dalle.train_dvae, or convert OpenAI's: python -m dalle.convert "
                     f"--openai-dvae)")
    try:
        kind = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != MODEL_TYPE:
        parser.error(f"argument {flag}: {path} does not hold a dVAE (its config.json says model_type {kind!r}, "
                     f"expected {MODEL_TYPE!r}; train one: python -m dalle.train_dvae)")
    try:  # read as the command will read it: a damaged folder is a usage error here, not a traceback later
        DVAE.load(path)
    except (ValueError, TypeError, RuntimeError, OverflowError, RecursionError, OSError) as e:
        parser.error(f"argument {flag}: {path} cannot be loaded: {str(e).splitlines()[0] if str(e) else type(e)}")
    return weights


def check_attn_backend(parser, backend: str, device_text: str, flag: str = "--attn-backend") -> None:
    """``triton`` runs on CUDA tensors, or on CPU ones only in Triton's interpreter (``TRITON_INTERPRET=1``);
    ``cuda`` on CUDA tensors with the built extension; ``cuda_emu`` on CPU tensors with the built emulator."""
    from dalle_kernels._dispatch import (
        cuda_extension_has,
        emu_extension_has,
        triton_available,
        triton_interpreter_enabled,
    )

    if backend == "cuda":
        if not device_is_cuda(device_text):
            parser.error(f"argument {flag}: cuda runs on a CUDA device (--device cuda); use auto, cpu or torch")
        if not cuda_extension_has("attention_forward"):
            parser.error(f"argument {flag}: cuda needs the CUDA extension built (README: Building the CUDA "
                         "extension); use auto or triton")
        return
    if backend == "cuda_emu":
        if device_is_cuda(device_text):
            parser.error(f"argument {flag}: cuda_emu runs the CUDA kernels on CPU tensors, for testing; "
                         "on a GPU use cuda or auto")
        if not emu_extension_has("attention_forward"):
            parser.error(f"argument {flag}: cuda_emu needs the emulator built (README: The CUDA emulation lane)")
        return
    if backend != "triton":
        return
    if not triton_available():
        parser.error(f"argument {flag}: triton needs the triton package (pip install triton); use auto, cpu or torch")
    if not device_is_cuda(device_text) and not triton_interpreter_enabled():
        parser.error(f"argument {flag}: triton on the CPU needs TRITON_INTERPRET=1 set before start; "
                     "use auto, cpu or torch")


def name_flags(message: str, fields) -> str:
    """``message`` of a config's ValueError with each field name (``Config.image_size``) as its flag."""
    import re

    for name in sorted(fields, key=len, reverse=True):
        message = re.sub(rf"(?<![\w-])(?:\w+Config\.)?{name}\b", "--" + name.replace("_", "-"), message)
    return message


def warn_greedy(temperature: float, rerank: int, top_k=None, top_p=None) -> None:
    """``--temperature 0`` samples greedily: every candidate is the same image and top-k/top-p change nothing."""
    if temperature != 0:
        return
    if rerank > 1:
        warn(f"--rerank {rerank} with --temperature 0: every candidate is the same greedy draw")
    for flag, value in (("--top-k", top_k), ("--top-p", top_p)):
        if value is not None:
            warn(f"{flag} {value:g}: has no effect with --temperature 0 (greedy)")


@dataclasses.dataclass
class SamplingOptions:
    """The sampler's flags, declared once for every command that samples (``dalle.generate``, the pipeline)."""

    temperature: float = option(1.0, nonneg_float, "sampling temperature (0: always the likeliest token)")
    top_k: int = option(None, positive_int, "sample among the k likeliest image tokens")
    top_p: float = option(None, float_in(0.0, 1.0, low_open=True),
                          "sample among the likeliest image tokens of total probability p, in (0, 1]")
    guidance: float = option(1.0, finite_float, "classifier-free guidance scale (1 = off; for a run trained with "
                                                "--cond-dropout)")
