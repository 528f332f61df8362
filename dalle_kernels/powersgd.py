"""PowerSGD gradient compression with error feedback, as a DDP communication hook (paper section 2.5, appendix E).

    from dalle_kernels.powersgd import PowerSGDState, powersgd_hook
    state = PowerSGDState(model, rank=4, start_iter=100)        # model: the module DDP wraps
    ddp_model.register_comm_hook(state, powersgd_hook)

or as a drop-in for PyTorch's ``powerSGD_hook`` (same constructor arguments, ``compression_stats()``, pickling
without the process group; see ``PowerSGDState``)::

    state = PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=10)
    ddp_model.register_comm_hook(state, powersgd_hook)

Per bucket and iteration (after ``start_iter``; before it, a plain mean all-reduce, as PyTorch's):

* every gradient, viewed as a matrix ``(shape[0], -1)``, not excluded and big enough to gain from
  compression (``min_compression_rate``), is compressed: ``M = G + E`` (``E``: this rank's error-feedback buffer),
  ``P = M Q`` (``Q``: last step's all-reduced ``Q``, the warm start, orthogonalized), all-reduce of all
  ``P`` of the bucket in one call, ``orthogonalize(P)`` (fused Householder kernel, one launch per shape),
  ``Q = M^T P``, one all-reduce of all ``Q``, ``G <- P Q^T / world``, ``E <- M - P Q^T / world`` (no ``E``
  with ``use_error_feedback=False``);
* 1-D tensors (gains, biases; with a model), embeddings and the names in ``exclude`` are all-reduced uncompressed in
  fp32, in the same all-reduce call as the ``P`` matrices;
* ``P``, ``Q`` and ``E`` are fp32 whatever the gradient dtype.

Non-finite gradients: every rank adds a flag to the ``P`` all-reduce; when any rank saw a non-finite
value, the bucket is all-reduced plainly instead, so every rank's trainer sees the non-finite gradient
and skips its update, and the error buffers and warm-start ``Q`` are left as they were.

Gradient scaling: the hook works on whatever gradients DDP hands it. A trainer that scales gradients
(a global loss scale or per-residual-block scales) passes scaled gradients through the hook and unscales
after the all-reduce; ``E`` is then kept in scaled units. When the trainer changes a block's scale it
should call ``state.rescale_error(factor, names)`` with ``factor = new_scale / old_scale`` so the error
carried into the next step stays in the same units as the new gradients.

Checkpoints: ``state.state_dict()`` holds the step count, ``E`` and the warm-start ``Q`` of every
compressed parameter, keyed by parameter name; ``load_state_dict`` restores them, so a resumed run
continues exactly as the uninterrupted one would (``P`` is recomputed from ``M`` and ``Q`` each step, so
``Q`` is all the warm-start state there is). ``E`` differs between ranks: save every rank's state_dict
(one file per rank) and load each rank its own.

Collectives are issued synchronously inside the hook, in bucket order (two all-reduces per compressed
bucket, one per uncompressed bucket), so every rank issues them in the same order on any backend; the
cost is that a bucket's compression does not overlap the rest of the backward pass.
"""

import inspect
import logging
import math
import zlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .ops.orthogonalize import orthogonalize

__all__ = ["PowerSGDState", "powersgd_hook", "fsdp_all_reduce_hook", "fsdp_matrix_hook", "uncompressed_parameter_names"]

logger = logging.getLogger(__name__)


def uncompressed_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters DALL-E sends uncompressed: ``nn.Embedding``/``nn.EmbeddingBag`` weights
    and every parameter with at most one dimension (gains, biases). Add the unembedding yourself."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    names = {name for name, p in model.named_parameters() if p.dim() <= 1}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Embedding, nn.EmbeddingBag)):
            names.add(f"{mod_name}.weight" if mod_name else "weight")
    return names


_OURS = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in (
    ("model", inspect.Parameter.empty), ("rank", 4), ("start_iter", 10), ("exclude", None), ("process_group", None),
    ("min_compression_rate", 2.0), ("warm_start", True), ("seed", 0), ("orthogonalize_backend", "auto"))] + [
    inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in (
        ("use_error_feedback", True), ("orthogonalization_epsilon", 0), ("batch_tensors_with_same_shape", False),
        ("compression_stats_logging_frequency", 10_000))])
# PyTorch's PowerSGDState(process_group, matrix_approximation_rank=1, start_powerSGD_iter=1_000, ...), in its order
# and with its defaults; model, exclude and orthogonalize_backend are ours, keyword-only.
_TORCH = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=d) for n, d in (
    ("process_group", inspect.Parameter.empty), ("matrix_approximation_rank", 1), ("start_powerSGD_iter", 1_000),
    ("min_compression_rate", 2), ("use_error_feedback", True), ("warm_start", True), ("orthogonalization_epsilon", 0),
    ("random_seed", 0), ("compression_stats_logging_frequency", 10_000),
    ("batch_tensors_with_same_shape", False))] + [
    inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=d) for n, d in (
        ("model", None), ("exclude", None), ("orthogonalize_backend", "auto"))])
_TORCH_ONLY = {"matrix_approximation_rank", "start_powerSGD_iter", "random_seed"}
_OURS_ONLY = {"rank", "start_iter", "seed"}
# what is kept when the state is pickled (PyTorch's __getstate__: everything but the process group)
_PICKLED = ("rank", "start_iter", "min_compression_rate", "warm_start", "seed", "orthogonalize_backend",
            "use_error_feedback", "compression_stats_logging_frequency", "batch_tensors_with_same_shape", "exclude",
            "iter", "error", "q", "skipped_iters", "numel_before", "numel_after", "next_stats_report", "_by_bucket")


class PowerSGDState:
    """State of ``powersgd_hook``: settings, step count, per-parameter error feedback and warm-start ``Q``.

    Two call forms. Ours, keyed by parameter name::

        PowerSGDState(model, rank=4, start_iter=10, exclude=None, process_group=None, min_compression_rate=2.0,
                      warm_start=True, seed=0, orthogonalize_backend="auto", *, use_error_feedback=True, ...)

    and PyTorch's (``torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook.PowerSGDState``), same argument
    order, names, defaults and meaning, so code written for ``powerSGD_hook`` switches by changing the import::

        PowerSGDState(process_group, matrix_approximation_rank=1, start_powerSGD_iter=1_000, min_compression_rate=2,
                      use_error_feedback=True, warm_start=True, orthogonalization_epsilon=0, random_seed=0,
                      compression_stats_logging_frequency=10_000, batch_tensors_with_same_shape=False,
                      *, model=None, exclude=None, orthogonalize_backend="auto")

    The form is PyTorch's when the first positional argument is not an ``nn.Module`` (``None`` or a process
    group) or, with keywords only, when a PyTorch name (``matrix_approximation_rank``, ``start_powerSGD_iter``,
    ``random_seed``) or ``process_group`` without ``model`` is given. Without a model, the error-feedback and
    warm-start buffers are keyed by bucket index and position in the bucket (``"bucket<i>.<j>"``), as PyTorch
    keys its own by bucket index: the buckets must not change once compression starts, which is why PyTorch's
    form requires ``start_powerSGD_iter > 1`` with error feedback or warm start (DDP rebuilds its buckets after
    the first iteration), and a resumed run must build DDP the same way (same model, same ``bucket_cap_mb``).
    With a model (either form), buffers are keyed by parameter name and embeddings are sent uncompressed.

    Args:
        model: the module whose parameters DDP reduces (the one passed to DDP, or ``ddp.module``);
            parameters are keyed by their names in it, which is what ``state_dict`` stores.
        rank (``matrix_approximation_rank``): rank of ``G ~ P Q^T`` (``min(rank, n, m)`` per matrix).
        start_iter (``start_powerSGD_iter``): iterations (counted once per backward) of plain mean all-reduce
            before compression starts.
        exclude: parameter names or parameter tensors sent uncompressed; default
            ``uncompressed_parameter_names(model)`` (embeddings, 1-D tensors), none without a model (then, as
            in PyTorch, 1-D tensors are ``n x 1`` matrices, compressed only if ``min_compression_rate < 1``).
        process_group: group to reduce over (default ``None``: the world).
        min_compression_rate: compress an ``n x m`` matrix only if ``(n + m) * r * rate < n * m``
            (PyTorch's rule), ``r = min(rank, n, m)``; any number > 0.
        use_error_feedback: keep ``E = M - P Q^T`` per rank and add it to the next gradient (True), or not.
        warm_start: reuse last step's ``Q`` (True) or draw a fresh random ``Q`` every step.
        seed (``random_seed``): seed of the random initial ``Q`` (drawn from the parameter name or bucket key, so
            equal on every rank; not the same random numbers as PyTorch's hook).
        orthogonalization_epsilon: only 0. PyTorch's Gram-Schmidt adds it to column norms to avoid dividing by
            zero; the Householder QR here never divides by a column norm (a zero column gives an orthonormal
            column, not NaN), so there is nothing to add it to: a nonzero value raises ``ValueError``.
        compression_stats_logging_frequency: log ``compression_stats()`` (logger ``dalle_kernels.powersgd``,
            level INFO) every this many iterations once compression runs, as PyTorch does.
        batch_tensors_with_same_shape: accepted for PyTorch compatibility (a bool); results are the same either
            way, and this hook always orthogonalizes equal-shaped matrices of a bucket in one batched launch.
        orthogonalize_backend: ``backend`` passed to ``dalle_kernels.orthogonalize``.

    Raises:
        TypeError: unknown or mixed-form arguments, a model that is not an ``nn.Module``, a flag not a bool.
        ValueError: a value out of range (the message names the argument).

    Pickling drops the process group (PyTorch's ``__getstate__``); unpickling sets it to ``None``, the world
    (PyTorch sets the default group, the same group). A state built with a model also drops the link to it: call
    ``bind_model(model)`` after unpickling it. ``state_dict()`` / ``load_state_dict()`` are the checkpoint format.
    """

    def __init__(self, *args, **kwargs):
        keys = set(kwargs)
        if keys & _TORCH_ONLY and keys & _OURS_ONLY:
            raise TypeError(f"PowerSGDState: mixes PyTorch's argument names {sorted(keys & _TORCH_ONLY)} with "
                            f"ours {sorted(keys & _OURS_ONLY)}; use one form")
        if args:
            torch_form = not isinstance(args[0], nn.Module)
        else:
            torch_form = bool(keys & _TORCH_ONLY) or ("process_group" in keys and "model" not in keys)
        sig = _TORCH if torch_form else _OURS
        try:
            bound = sig.bind(*args, **kwargs)
        except TypeError as e:
            form = "PyTorch's form PowerSGDState(process_group, matrix_approximation_rank, ...)" if torch_form \
                else "PowerSGDState(model, rank, start_iter, ...)"
            raise TypeError(f"PowerSGDState: {e} (called as {form})") from None
        bound.apply_defaults()
        a = bound.arguments
        if torch_form:
            a["rank"], a["start_iter"], a["seed"] = (a.pop("matrix_approximation_rank"), a.pop("start_powerSGD_iter"),
                                                     a.pop("random_seed"))
        model, rank, start_iter = a["model"], a["rank"], a["start_iter"]
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not torch_form and model is None:
            raise TypeError("model must be a torch.nn.Module, got None (or call PowerSGDState(process_group, "
                            "matrix_approximation_rank=..., ...) as PyTorch's)")
        pg = a["process_group"]
        if pg is not None and not isinstance(pg, dist.ProcessGroup):
            raise TypeError(f"process_group must be a torch.distributed.ProcessGroup or None, got {type(pg).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int (matrix_approximation_rank), got {rank!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter (start_powerSGD_iter) must be a non-negative int, got {start_iter!r}")
        rate = a["min_compression_rate"]
        if isinstance(rate, bool) or not isinstance(rate, (int, float)) or not 0 < rate < float("inf"):
            raise ValueError(f"min_compression_rate must be a finite number > 0, got {rate!r}")
        for flag in ("use_error_feedback", "warm_start", "batch_tensors_with_same_shape"):
            if not isinstance(a[flag], bool):
                raise TypeError(f"{flag} must be a bool, got {a[flag]!r}")
        eps = a["orthogonalization_epsilon"]
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or eps != 0:
            raise ValueError(f"orthogonalization_epsilon must be 0, got {eps!r}: the Householder QR used here never "
                             "divides by a column norm (zero columns give orthonormal columns, not NaN), so there "
                             "is no epsilon to add")
        seed, freq = a["seed"], a["compression_stats_logging_frequency"]
        for name, v in (("seed (random_seed)", seed), ("compression_stats_logging_frequency", freq)):
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"{name} must be an int, got {v!r}")
        if model is None and (a["use_error_feedback"] or a["warm_start"]) and start_iter <= 1:
            raise ValueError("Expect `start_powerSGD_iter` > 1 if `use_error_feedback` or `warm_start` is enabled, "
                             "because PowerSGD can only be applied after the first two iterations in DDP "
                             "(without a model, buffers are keyed by bucket, and DDP rebuilds buckets after "
                             "iteration 1); pass model= to key them by parameter name instead")
        self.rank = rank
        self.start_iter = start_iter
        self.process_group = pg
        self.min_compression_rate = float(rate)
        self.use_error_feedback = a["use_error_feedback"]
        self.warm_start = a["warm_start"]
        self.seed = seed
        self.orthogonalize_backend = a["orthogonalize_backend"]
        self.compression_stats_logging_frequency = max(1, freq)
        self.batch_tensors_with_same_shape = a["batch_tensors_with_same_shape"]
        self.next_stats_report = 0
        self.iter = 0
        self.error: dict[str, torch.Tensor] = {}
        self.q: dict[str, torch.Tensor] = {}
        self.skipped_iters = 0  # iterations whose compression was skipped for non-finite gradients
        self.numel_before = 0
        self.numel_after = 0
        self._by_bucket = model is None
        self._exclude_arg = a["exclude"]
        self.exclude: set[str] = set()
        self._reset_links()
        if model is not None:
            self.bind_model(model)
        elif self._exclude_arg is not None:
            self._add_exclude(self._exclude_arg)

    def _reset_links(self) -> None:
        self._names: dict[int, str] = {}
        self._layouts: dict[tuple, _Layout] = {}
        self._last_skip = -1
        self._bound = False

    def _add_exclude(self, items) -> None:
        for item in items:
            if isinstance(item, torch.Tensor):
                if id(item) not in self._names:
                    raise ValueError("exclude holds a tensor that is not a parameter of model")
                self.exclude.add(self._names[id(item)])
            elif isinstance(item, str):
                self.exclude.add(item)
            else:
                raise TypeError(f"exclude must hold parameter names or parameters, got {type(item).__name__}")

    def bind_model(self, model: nn.Module) -> None:
        """Key buffers by ``model``'s parameter names: done by the constructor when given a model; call it after
        unpickling a state that was built with one (pickles do not hold the model)."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self._by_bucket and (self.error or self.q):
            raise ValueError("this state keys its buffers by bucket (built without a model); it cannot be bound "
                             "to a model's parameter names")
        self._reset_links()
        self._by_bucket = False
        self._names = {id(p): name for name, p in model.named_parameters()}
        if self._exclude_arg is None:
            self._exclude_arg = uncompressed_parameter_names(model)
        if not self.exclude:
            self._add_exclude(self._exclude_arg)
        self._exclude_arg = sorted(self.exclude)  # names only: tensors do not outlive a pickle
        self._bound = True

    # -- PyTorch's names ---------------------------------------------------------------------------
    matrix_approximation_rank = property(lambda self: self.rank)
    start_powerSGD_iter = property(lambda self: self.start_iter)
    random_seed = property(lambda self: self.seed)
    orthogonalization_epsilon = property(lambda self: 0)
    total_numel_before_compression = property(lambda self: self.numel_before)
    total_numel_after_compression = property(lambda self: self.numel_after)

    def compression_stats(self) -> tuple[float, int, int]:
        """``(compress_rate, numel_before_compression, numel_after_compression)`` over the compressed iterations
        so far, as PyTorch's ``PowerSGDState.compression_stats``: element counts of the gradients and of what was
        sent in their place (``(n + m) * r`` per compressed ``n x m`` matrix, ``numel`` per uncompressed tensor);
        ``compress_rate = before / after`` (0 before any compressed iteration)."""
        rate = self.numel_before / self.numel_after if self.numel_after > 0 else 0
        return rate, self.numel_before, self.numel_after

    def __getstate__(self) -> dict:
        logger.warning("NOTE: Process group is not serializable and excluded from a saved state.")
        return {k: getattr(self, k) for k in _PICKLED}

    def __setstate__(self, state: dict) -> None:
        for k, v in state.items():
            setattr(self, k, v)
        self.process_group = None
        logger.warning("NOTE: Process group will be set to None, the world. If a different group is desired, set "
                       "`process_group` after the state is loaded.")
        self._exclude_arg = sorted(self.exclude) if not self._by_bucket else None
        self._reset_links()

    # -- bookkeeping ------------------------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
        if not self._bound:
            raise RuntimeError("this PowerSGDState was built with a model and then unpickled: call "
                               "state.bind_model(model) before training with it")
        try:
            return self._names[id(param)]
        except KeyError:
            raise RuntimeError("DDP reduced a parameter that is not in the model given to PowerSGDState; "
                               "build the state from the module that DDP wraps") from None

    def compression_ratio(self) -> float:
        """Elements sent / elements of the gradients, over the compressed iterations so far."""
        return self.numel_after / self.numel_before if self.numel_before else 1.0

    def rescale_error(self, factor: float, names: Iterable[str] | None = None) -> None:
        """Multiply the error-feedback buffers (of ``names``, default all) by ``factor``: call it when the
        trainer's gradient scale of those parameters changes by ``factor``."""
        for name in (self.error if names is None else names):
            if name in self.error:
                self.error[name].mul_(factor)

    def state_dict(self) -> dict:
        return {"version": 1, "iter": self.iter, "rank": self.rank, "skipped_iters": self.skipped_iters,
                "error": {k: v.detach().cpu().clone() for k, v in self.error.items()},
                "q": {k: v.detach().cpu().clone() for k, v in self.q.items()}}

    def load_state_dict(self, sd: dict) -> None:
        if not isinstance(sd, dict) or sd.get("version") != 1:
            raise ValueError("not a PowerSGDState state_dict (missing or unknown 'version')")
        if sd["rank"] != self.rank:
            raise ValueError(f"state_dict was saved with rank={sd['rank']}, this state has rank={self.rank}")
        # without a model the keys are bucket positions, known only once the hook has seen the buckets
        known = set(self._names.values())
        unknown = set() if self._by_bucket else (set(sd["error"]) | set(sd["q"])) - known
        if unknown:
            raise ValueError(f"state_dict holds buffers of parameters this model lacks: {sorted(unknown)[:5]}")
        self.iter = int(sd["iter"])
        self.skipped_iters = int(sd.get("skipped_iters", 0))
        # Kept where they were saved (CPU); moved to the gradients' device at first use.
        self.error = {k: v.clone().float() for k, v in sd["error"].items()}
        self.q = {k: v.clone().float() for k, v in sd["q"].items()}

    def _maybe_increase_iter(self, is_last: bool) -> None:
        if is_last:
            self.iter += 1

    def _report_compression_stats(self, is_last: bool) -> None:
        """Log ``compression_stats()`` every ``compression_stats_logging_frequency`` iterations (PyTorch's)."""
        if is_last and self.iter >= self.next_stats_report:
            rate, before, after = self.compression_stats()
            logger.info("Compression stats: iter %s, total before compression %s, total after compression %s, "
                        "rate %s", self.iter, before, after, rate)
            self.next_stats_report = self.iter + self.compression_stats_logging_frequency

    def _initial_q(self, name: str, m: int, r: int, device) -> torch.Tensor:
        salt = 0 if self.warm_start else self.iter
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) + salt) % 2**63)
        return torch.randn(m, r, generator=g).to(device)

    def _layout(self, bucket) -> "_Layout":
        params = bucket.parameters()
        key = (bucket.index(),) + tuple(id(p) for p in params)
        lay = self._layouts.get(key)
        if lay is None:
            names = ([f"bucket{bucket.index()}.{j}" for j in range(len(params))] if self._by_bucket
                     else [self.name_of(p) for p in params])
            lay = _Layout(self, [tuple(p.shape) for p in params], names)
            self._layouts[key] = lay
        return lay


class _Layout:
    """Where each gradient of a bucket goes: compressed (offsets in the flat P and Q buffers, sorted by
    shape so equal shapes form one contiguous batch for ``orthogonalize``) or uncompressed."""

    def __init__(self, state: PowerSGDState, shapes, names):
        self.names = names
        self.compressed = []  # (position in bucket, name, n, m, r)
        self.uncompressed = []  # (position in bucket, numel)
        for i, (shape, name) in enumerate(zip(shapes, self.names)):
            # viewed as (shape[0], -1), 1-D tensors as n x 1 matrices, and PyTorch's rule: with the default
            # min_compression_rate (> 1) a matrix with a dimension of 1 is never compressed
            numel = math.prod(shape)
            n = shape[0] if len(shape) >= 1 else 0
            m = numel // n if n else 0
            r = min(state.rank, n, m)
            worth = n > 0 and m > 0 and (n + m) * r * state.min_compression_rate < n * m
            if name not in state.exclude and worth:
                self.compressed.append((i, name, n, m, r))
            else:
                self.uncompressed.append((i, numel))
        self.p_off, self.p_batches, self.p_size = self._pack([(c[2], c[4]) for c in self.compressed])
        self.q_off, self.q_batches, self.q_size = self._pack([(c[3], c[4]) for c in self.compressed])
        self.u_size = sum(numel for _, numel in self.uncompressed)
        self.numel = sum(math.prod(shape) for shape in shapes)
        self.sent = self.p_size + self.q_size + self.u_size

    @staticmethod
    def _pack(shapes):
        """Offsets of ``rows x r`` blocks in one flat buffer, grouped by shape; ``batches`` lists
        ``(offset, count, rows, r)`` for each group."""
        order = sorted(range(len(shapes)), key=lambda j: shapes[j])
        offsets, batches, off = [0] * len(shapes), [], 0
        for j in order:
            rows, r = shapes[j]
            if batches and batches[-1][2:] == (rows, r):
                o, c, _, _ = batches[-1]
                batches[-1] = (o, c + 1, rows, r)
            else:
                batches.append((off, 1, rows, r))
            offsets[j] = off
            off += rows * r
        return offsets, batches, off


def _orthogonalize_batches(flat: torch.Tensor, batches, backend: str) -> None:
    for off, count, rows, r in batches:
        orthogonalize(flat[off:off + count * rows * r].view(count, rows, r), backend=backend)


def _allreduce(t: torch.Tensor, group) -> torch.futures.Future:
    return dist.all_reduce(t, group=group, async_op=True).get_future()


def powersgd_hook(state: PowerSGDState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: PowerSGD with error feedback (module docstring). Register it with
    ``ddp_model.register_comm_hook(state, powersgd_hook)``; returns a future of the bucket buffer that
    holds the averaged (decompressed) gradients."""
    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    buf = bucket.buffer()
    if state.iter < state.start_iter:
        state._maybe_increase_iter(bucket.is_last())
        return _allreduce(buf.div_(world), group).then(lambda fut: fut.value()[0])
    if not _compressed_allreduce(state, state._layout(bucket), buf, bucket.gradients(), group, bucket.is_last()):
        return _allreduce(buf.div_(world), group).then(lambda fut: fut.value()[0])
    fut = torch.futures.Future(devices=[buf.device] if buf.device.type == "cuda" else None)
    fut.set_result(buf)
    return fut


def _compressed_allreduce(state: PowerSGDState, lay: "_Layout", buf: torch.Tensor, grads: list, group,
                          is_last: bool) -> bool:
    """Replace ``grads`` (views of ``buf``, laid out as ``lay``) by their PowerSGD mean over ``group``, in place;
    ``False`` (nothing changed, error feedback and warm start untouched) when some rank saw a non-finite value:
    the caller then all-reduces ``buf`` plainly, so every trainer sees it and skips its step."""
    world = dist.get_world_size(group)
    it = state.iter
    device = buf.device
    finite = bool(torch.isfinite(buf).all())

    # All P of the bucket, the uncompressed gradients (fp32) and the non-finite flag: one all-reduce.
    first = torch.zeros(lay.p_size + lay.u_size + 1, dtype=torch.float32, device=device)
    p_flat = first[:lay.p_size]
    q_flat = torch.empty(lay.q_size, dtype=torch.float32, device=device)
    mats, ps, qs = [], [], []
    for j, (i, name, n, m, r) in enumerate(lay.compressed):
        ps.append(p_flat[lay.p_off[j]:lay.p_off[j] + n * r].view(n, r))
        q = q_flat[lay.q_off[j]:lay.q_off[j] + m * r].view(m, r)
        warm = state.q.get(name) if state.warm_start else None
        q.copy_(warm if warm is not None and warm.shape == (m, r) else state._initial_q(name, m, r, device))
        qs.append(q)
        err = state.error.get(name) if state.use_error_feedback else None
        if err is not None and err.shape != (n, m):
            raise RuntimeError(f"error-feedback buffer {name!r} has shape {tuple(err.shape)}, the gradient "
                               f"{(n, m)}: the DDP buckets or the shards changed since it was saved (build DDP "
                               "as before, or give PowerSGDState the model to key buffers by parameter name)")
        M = grads[i].reshape(n, m).float()
        mats.append(M + err.to(device) if err is not None else M.clone())
    if finite and mats:
        _orthogonalize_batches(q_flat, lay.q_batches, state.orthogonalize_backend)
        for M, p, q in zip(mats, ps, qs):
            torch.mm(M, q, out=p)
    off = lay.p_size
    for i, numel in lay.uncompressed:
        first[off:off + numel].copy_(grads[i].reshape(-1))
        off += numel
    first[-1] = 0.0 if finite else 1.0
    state._maybe_increase_iter(is_last)

    # Collectives run here, in bucket order, on the thread that calls the hook: callbacks that launch the
    # Q all-reduce when a P all-reduce completes would order collectives by timing, which can differ
    # between ranks (a collective mismatch on gloo). Computation is small next to the backward pass.
    dist.all_reduce(first, group=group)
    if first[-1].item() > 0:
        if state._last_skip != it:
            state._last_skip = it
            state.skipped_iters += 1
        return False
    off = lay.p_size
    for i, numel in lay.uncompressed:
        grads[i].copy_(first[off:off + numel].view_as(grads[i]).div_(world))
        off += numel
    if mats:
        _orthogonalize_batches(p_flat, lay.p_batches, state.orthogonalize_backend)
        for M, p, q in zip(mats, ps, qs):
            torch.mm(M.t(), p, out=q)
        dist.all_reduce(q_flat, group=group)
        q_flat.div_(world)
        for j, (i, name, n, m, r) in enumerate(lay.compressed):
            approx = ps[j] @ qs[j].t()
            if state.use_error_feedback:
                state.error[name] = mats[j].sub_(approx)  # M is this step's temporary: reuse it as E
            state.q[name] = qs[j].clone()
            grads[i].copy_(approx.view_as(grads[i]))
    state.numel_before += lay.numel
    state.numel_after += lay.sent
    state._report_compression_stats(is_last)
    return True


def fsdp_all_reduce_hook(state: PowerSGDState, names: list, shard_shapes: list, process_group, is_last: bool):
    """PowerSGD between replicas for one FSDP2 unit: a hook for ``FSDPModule.set_all_reduce_hook``.

    With ``fully_shard`` on the shard dimension of a 2-D (replicas x shards) mesh, FSDP2 reduce-scatters each
    unit's gradients inside a replica and hands the flat reduce-scatter output to this hook, which averages it
    over ``process_group`` (the ranks holding the same shard in the other replicas) as ``powersgd_hook`` does a
    DDP bucket: each parameter's gradient shard ``(rows, *rest)`` is compressed as a ``rows x prod(rest)``
    matrix (error feedback and warm start per shard, keyed by ``names``), the rest is sent whole.

    Args:
        state: a ``PowerSGDState`` built with the model (buffers keyed by parameter name); its ``exclude``
            applies by name.
        names: the unit's parameter names, in the order FSDP2 lays them out in the flat output (its managed
            modules in post-order, children first, each module's own parameters in registration order).
        shard_shapes: each parameter's padded shard shape in the flat output (dim 0 is
            ``ceil(shape[0] / shards)``), same order.
        process_group: the replicas' group of this rank.
        is_last: whether this unit's reduction ends the backward (the root unit): the step count advances.

    Raises:
        RuntimeError (from the hook): the flat output's size is not the sum of ``shard_shapes``.
    """
    lay = _Layout(state, [tuple(s) for s in shard_shapes], list(names))
    sizes = [math.prod(s) for s in shard_shapes]
    total = sum(sizes)

    def hook(reduce_output: torch.Tensor) -> None:
        if reduce_output.numel() != total:
            raise RuntimeError(f"FSDP handed a flat gradient of {reduce_output.numel()} elements; the unit's shards "
                               f"({', '.join(names[:3])}...) hold {total}")
        world = dist.get_world_size(process_group)
        if state.iter < state.start_iter:
            state._maybe_increase_iter(is_last)
            dist.all_reduce(reduce_output.div_(world), group=process_group)
            return
        grads, off = [], 0
        for shape, size in zip(shard_shapes, sizes):
            grads.append(reduce_output[off:off + size].view(shape))
            off += size
        if not _compressed_allreduce(state, lay, reduce_output, grads, process_group, is_last):
            dist.all_reduce(reduce_output.div_(world), group=process_group)

    return hook


def fsdp_matrix_hook(state: PowerSGDState, names: list, full_shapes: list, shard_group, replicate_group,
                     is_last: bool, factor_dtype: torch.dtype = torch.bfloat16):
    """PowerSGD between replicas on whole matrices sharded across a machine (paper appendix E as README "Training
    at scale" reads it): a hook for ``FSDPModule.set_all_reduce_hook``, like ``fsdp_all_reduce_hook``, but each
    compressed gradient ``n x m`` is factored whole at rank ``r = min(rank, n, m)``, not shard by shard, so the
    paper's ranks (larger than a shard's ``n / G`` rows) apply.

    The matrix ``M`` (gradient plus error feedback) is split by rows over the ``G`` ranks of ``shard_group`` (FSDP2's
    padded ``ceil(n / G)``-row shards; padding rows are zeroed). Per step, with ``Q`` (``m x r``, equal on all ranks,
    orthogonalized; warm start): ``P_s = M_s Q`` on each rank, all-reduced over ``replicate_group`` in
    ``factor_dtype`` (16 bits, as the paper's factors and their all-reduce) together with the unit's uncompressed
    gradients (float32) and a non-finite flag; ``P`` gathered over ``shard_group`` and orthogonalized whole
    (Householder), each rank keeping its rows; ``Q = sum_s M_s^T P_s`` summed over ``shard_group`` and then, each
    rank its ``1/G`` share, all-reduced over ``replicate_group`` in ``factor_dtype`` and gathered back; the mean
    gradient shard is ``P_s Q^T / replicas`` and the error feedback ``M_s - P_s Q^T / replicas``, kept in
    ``factor_dtype`` (the paper's 16-bit error buffers; a buffer of its own, beside FSDP2's gradient shard). Each
    rank keeps only its ``1/G`` share of each ``Q`` (in ``factor_dtype``, ``state.q``), gathered in the machine
    for the next step's warm start. Each rank thus sends ``ceil(n/G) r + ceil(m r / G)``
    elements of a matrix between replicas (``dalle.plan``'s ``paper`` layout, plus the flag and padding).

    Args: ``state`` (its ``rank``, ``start_iter``, ``exclude``, ``min_compression_rate``, ``warm_start``,
    ``use_error_feedback``; ``error``/``q`` keyed by parameter name), ``names`` and ``full_shapes`` (the unit's
    parameters in FSDP2's flat order and their unsharded shapes), the two groups, ``is_last`` (the root unit: the
    step count advances), ``factor_dtype`` (``torch.bfloat16``, ``torch.float16`` or ``torch.float32``).

    Raises (from the hook) ``RuntimeError`` when the flat output's size is not the sum of the padded shards.
    A non-finite value on any rank of the machine or any replica: the whole unit is all-reduced plainly (every
    trainer sees it and skips the step), error feedback and warm start untouched.
    """
    G = dist.get_world_size(shard_group)
    s_idx = dist.get_rank(shard_group)
    rows = [-(-shape[0] // G) for shape in full_shapes]
    sizes = [rs * (math.prod(shape) // shape[0]) for rs, shape in zip(rows, full_shapes)]
    total = sum(sizes)
    comp, unc = [], []  # (position, name, n, m, r, real rows of this shard) / (position)
    for i, (name, shape) in enumerate(zip(names, full_shapes)):
        n = shape[0]
        m = math.prod(shape) // n
        r = min(state.rank, n, m)
        if name not in state.exclude and len(shape) >= 2 and (n + m) * r * state.min_compression_rate < n * m:
            real = max(0, min(n, (s_idx + 1) * rows[i]) - s_idx * rows[i])
            comp.append((i, name, n, m, r, real))
        else:
            unc.append(i)

    chunks = [-(-m * r // G) for _, _, _, m, r, _ in comp]  # each rank's share of each Q
    q_offs = [G * sum(chunks[:j]) for j in range(len(chunks))]

    def _gather_q(share: torch.Tensor) -> list:
        """Every rank's shares of the unit's Qs (``share``: this rank's, concatenated) -> the whole Qs, float32."""
        parts = [torch.empty_like(share) for _ in range(G)]
        dist.all_gather(parts, share, group=shard_group)
        out, off = [], 0
        for (_, _, _, m, r, _), c in zip(comp, chunks):
            out.append(torch.cat([p[off:off + c] for p in parts])[:m * r].float().view(m, r))
            off += c
        return out

    def hook(reduce_output: torch.Tensor) -> None:
        if reduce_output.numel() != total:
            raise RuntimeError(f"FSDP handed a flat gradient of {reduce_output.numel()} elements; the unit's shards "
                               f"({', '.join(names[:3])}...) hold {total}")
        world = dist.get_world_size(replicate_group)
        if state.iter < state.start_iter or not comp:
            state._maybe_increase_iter(is_last)
            dist.all_reduce(reduce_output.div_(world), group=replicate_group)
            return
        device = reduce_output.device
        grads, off = [], 0
        for size in sizes:
            grads.append(reduce_output[off:off + size])
            off += size
        finite = bool(torch.isfinite(reduce_output).all())
        mats = []
        for i, name, n, m, r, real in comp:
            M = grads[i].view(rows[i], m).float()
            M[real:] = 0.0
            err = state.error.get(name) if state.use_error_feedback else None
            if err is not None and tuple(err.shape) != (rows[i], m):
                raise RuntimeError(f"error-feedback buffer {name!r} has shape {tuple(err.shape)}, this shard "
                                   f"{(rows[i], m)}: the mesh changed since it was saved")
            mats.append(M + err.to(device, torch.float32) if err is not None else M.clone())
        # Q: each rank keeps its 1/G share of every matrix's Q (warm start); gathered in the machine
        warm = state.warm_start and all(tuple(getattr(state.q.get(name), "shape", ())) == (chunks[j],)
                                        for j, (_, name, *_rest) in enumerate(comp))
        if warm:
            qs = _gather_q(torch.cat([state.q[name].to(device, factor_dtype) for _, name, *_r in comp]))
        else:
            qs = [state._initial_q(name, m, r, device) for _, name, n, m, r, _ in comp]
        for q in qs:
            orthogonalize(q.unsqueeze(0), backend=state.orthogonalize_backend)
        p_sizes = [rows[i] * r for i, _, _, _, r, _ in comp]
        p_size, u_size = sum(p_sizes), sum(sizes[i] for i in unc)
        # P rows (16-bit) and, in float32, the uncompressed gradients and the flag: two buffers, one all-reduce each
        p_flat = torch.zeros(p_size, dtype=factor_dtype, device=device)
        rest = torch.zeros(u_size + 1, dtype=torch.float32, device=device)
        off = 0
        for M, q, ps in zip(mats, qs, p_sizes):
            if finite:
                p_flat[off:off + ps].copy_((M @ q).reshape(-1))
            off += ps
        off = 0
        for i in unc:
            rest[off:off + sizes[i]].copy_(grads[i])
            off += sizes[i]
        rest[-1] = 0.0 if finite else 1.0
        state._maybe_increase_iter(is_last)
        dist.all_reduce(p_flat, group=replicate_group)
        dist.all_reduce(rest, group=replicate_group)
        flag = rest[-1:].clone()
        dist.all_reduce(flag, group=shard_group)  # a non-finite value anywhere in the machine
        if flag.item() > 0:
            if state._last_skip != state.iter - 1:
                state._last_skip = state.iter - 1
                state.skipped_iters += 1
            dist.all_reduce(reduce_output.div_(world), group=replicate_group)
            return
        off = 0
        for i in unc:
            grads[i].copy_(rest[off:off + sizes[i]].div_(world))
            off += sizes[i]
        gathered = [torch.empty_like(p_flat) for _ in range(G)]
        dist.all_gather(gathered, p_flat, group=shard_group)
        q_parts, off = [], 0
        ps_local = []
        for j, ((i, name, n, m, r, real), ps) in enumerate(zip(comp, p_sizes)):
            full = torch.cat([g[off:off + ps].view(rows[i], r) for g in gathered]).float()
            orthogonalize(full.unsqueeze(0), backend=state.orthogonalize_backend)
            p_s = full[s_idx * rows[i]:(s_idx + 1) * rows[i]]
            ps_local.append(p_s)
            q_parts.append((mats[j].t() @ p_s).reshape(-1))
            off += ps
        q_flat = torch.cat([torch.nn.functional.pad(q, (0, G * c - q.numel())) for q, c in zip(q_parts, chunks)])
        dist.all_reduce(q_flat, group=shard_group)  # the machine's Q = sum over its shards
        share = torch.cat([q_flat[o + s_idx * c:o + (s_idx + 1) * c] for o, c in zip(q_offs, chunks)])
        share = share.to(factor_dtype)
        dist.all_reduce(share, group=replicate_group)  # between machines: this rank's 1/G of every Q
        share = share.float().div_(world).to(factor_dtype)
        full_qs = _gather_q(share)
        off = 0
        for j, (i, name, n, m, r, real) in enumerate(comp):
            approx = ps_local[j] @ full_qs[j].t()
            approx[real:] = 0.0
            if state.use_error_feedback:
                state.error[name] = mats[j].sub_(approx).to(factor_dtype)
            state.q[name] = share[off:off + chunks[j]].clone()
            off += chunks[j]
            grads[i].copy_(approx.reshape(-1))
        state.numel_before += total
        state.numel_after += p_size + sum(chunks) + u_size
        state._report_compression_stats(is_last)

    return hook
