"""PowerSGD gradient compression with error feedback, as a DDP communication hook (SPEC.md, section 4).

    from dalle_kernels.powersgd import PowerSGDState, powersgd_hook
    state = PowerSGDState(model, rank=4, start_iter=100)        # model: the module DDP wraps
    ddp_model.register_comm_hook(state, powersgd_hook)

Per bucket and iteration (after ``start_iter``; before it, a plain mean all-reduce):

* every gradient that is a matrix (``>= 2`` dims, viewed as ``(shape[0], -1)``), not excluded and big
  enough to gain from compression, is compressed: ``M = G + E`` (``E``: this rank's error-feedback buffer),
  ``P = M Q`` (``Q``: last step's all-reduced ``Q``, the warm start, orthogonalized), all-reduce of all
  ``P`` of the bucket in one call, ``orthogonalize(P)`` (fused Householder kernel, one launch per shape),
  ``Q = M^T P``, one all-reduce of all ``Q``, ``G <- P Q^T / world``, ``E <- M - P Q^T / world``;
* 1-D tensors (gains, biases), embeddings and the names in ``exclude`` are all-reduced uncompressed in
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

import zlib
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from .ops.orthogonalize import orthogonalize

__all__ = ["PowerSGDState", "powersgd_hook", "uncompressed_parameter_names"]


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


class PowerSGDState:
    """State of ``powersgd_hook``: settings, step count, per-parameter error feedback and warm-start ``Q``.

    Args:
        model: the module whose parameters DDP reduces (the one passed to DDP, or ``ddp.module``);
            parameters are keyed by their names in it, which is what ``state_dict`` stores.
        rank: rank of the approximation ``G ~ P Q^T`` (``min(rank, n, m)`` per matrix).
        start_iter: iterations (counted once per backward) of plain all-reduce before compression starts.
        exclude: parameter names or parameter tensors sent uncompressed; default
            ``uncompressed_parameter_names(model)`` (embeddings, 1-D tensors).
        process_group: group to reduce over (default: the world).
        min_compression_rate: compress an ``n x m`` matrix only if ``n*m >= rate * (n+m) * rank``.
        warm_start: reuse last step's ``Q`` (True) or draw a fresh random ``Q`` every step.
        seed: seed of the random initial ``Q`` (drawn from the parameter name, so equal on every rank).
        orthogonalize_backend: ``backend`` passed to ``dalle_kernels.orthogonalize``.
    """

    def __init__(self, model: nn.Module, rank: int = 4, start_iter: int = 10, exclude: Iterable | None = None,
                 process_group=None, min_compression_rate: float = 2.0, warm_start: bool = True, seed: int = 0,
                 orthogonalize_backend: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
            raise ValueError(f"rank must be a positive int, got {rank!r}")
        if isinstance(start_iter, bool) or not isinstance(start_iter, int) or start_iter < 0:
            raise ValueError(f"start_iter must be a non-negative int, got {start_iter!r}")
        if isinstance(min_compression_rate, bool) or not isinstance(min_compression_rate, (int, float)) \
                or not 1 <= min_compression_rate < float("inf"):
            raise ValueError(f"min_compression_rate must be a finite number >= 1, got {min_compression_rate!r}")
        self.rank = rank
        self.start_iter = start_iter
        self.process_group = process_group
        self.min_compression_rate = float(min_compression_rate)
        self.warm_start = bool(warm_start)
        self.seed = int(seed)
        self.orthogonalize_backend = orthogonalize_backend
        self._names = {id(p): name for name, p in model.named_parameters()}
        if exclude is None:
            exclude = uncompressed_parameter_names(model)
        self.exclude = set()
        for item in exclude:
            if isinstance(item, torch.Tensor):
                if id(item) not in self._names:
                    raise ValueError("exclude holds a tensor that is not a parameter of model")
                self.exclude.add(self._names[id(item)])
            elif isinstance(item, str):
                self.exclude.add(item)
            else:
                raise TypeError(f"exclude must hold parameter names or parameters, got {type(item).__name__}")
        self.iter = 0
        self.error: dict[str, torch.Tensor] = {}
        self.q: dict[str, torch.Tensor] = {}
        self.skipped_iters = 0  # iterations whose compression was skipped for non-finite gradients
        self._last_skip = -1
        self.numel_before = 0
        self.numel_after = 0
        self._layouts: dict[tuple, _Layout] = {}

    # -- bookkeeping ------------------------------------------------------------------------------
    def name_of(self, param: torch.Tensor) -> str:
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
        known = set(self._names.values())
        unknown = (set(sd["error"]) | set(sd["q"])) - known
        if unknown:
            raise ValueError(f"state_dict holds buffers of parameters this model lacks: {sorted(unknown)[:5]}")
        self.iter = int(sd["iter"])
        self.skipped_iters = int(sd.get("skipped_iters", 0))
        # Kept where they were saved (CPU); moved to the gradients' device at first use.
        self.error = {k: v.clone().float() for k, v in sd["error"].items()}
        self.q = {k: v.clone().float() for k, v in sd["q"].items()}

    def _maybe_increase_iter(self, bucket) -> None:
        if bucket.is_last():
            self.iter += 1

    def _initial_q(self, name: str, m: int, r: int, device) -> torch.Tensor:
        salt = 0 if self.warm_start else self.iter
        g = torch.Generator().manual_seed((self.seed * 1_000_003 + zlib.crc32(name.encode()) + salt) % 2**63)
        return torch.randn(m, r, generator=g).to(device)

    def _layout(self, bucket) -> "_Layout":
        params = bucket.parameters()
        key = tuple(id(p) for p in params)
        lay = self._layouts.get(key)
        if lay is None:
            lay = _Layout(self, params)
            self._layouts[key] = lay
        return lay


class _Layout:
    """Where each gradient of a bucket goes: compressed (offsets in the flat P and Q buffers, sorted by
    shape so equal shapes form one contiguous batch for ``orthogonalize``) or uncompressed."""

    def __init__(self, state: PowerSGDState, params):
        self.names = [state.name_of(p) for p in params]
        self.compressed = []  # (position in bucket, name, n, m, r)
        self.uncompressed = []  # (position in bucket, numel)
        for i, (p, name) in enumerate(zip(params, self.names)):
            n = p.shape[0] if p.dim() >= 2 else 0
            m = p.numel() // n if n else 0
            r = min(state.rank, n, m)
            worth = p.dim() >= 2 and n * m >= state.min_compression_rate * (n + m) * r
            if name not in state.exclude and worth:
                self.compressed.append((i, name, n, m, r))
            else:
                self.uncompressed.append((i, p.numel()))
        self.p_off, self.p_batches, self.p_size = self._pack([(c[2], c[4]) for c in self.compressed])
        self.q_off, self.q_batches, self.q_size = self._pack([(c[3], c[4]) for c in self.compressed])
        self.u_size = sum(numel for _, numel in self.uncompressed)
        self.numel = sum(p.numel() for p in params)
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
        state._maybe_increase_iter(bucket)
        return _allreduce(buf.div_(world), group).then(lambda fut: fut.value()[0])

    it = state.iter
    lay = state._layout(bucket)
    grads = bucket.gradients()
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
        err = state.error.get(name)
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
    state._maybe_increase_iter(bucket)

    # Collectives run here, in bucket order, on the thread that calls the hook: callbacks that launch the
    # Q all-reduce when a P all-reduce completes would order collectives by timing, which can differ
    # between ranks (a collective mismatch on gloo). Computation is small next to the backward pass.
    dist.all_reduce(first, group=group)
    if first[-1].item() > 0:
        # Some rank saw inf/nan: reduce the raw bucket so every trainer sees it and skips its step;
        # error feedback and warm-start Q stay as they were.
        if state._last_skip != it:
            state._last_skip = it
            state.skipped_iters += 1
        return _allreduce(buf.div_(world), group).then(lambda fut: fut.value()[0])
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
            state.error[name] = mats[j].sub_(approx)  # M is this step's temporary: reuse it as E
            state.q[name] = qs[j].clone()
            grads[i].copy_(approx.view_as(grads[i]))
    state.numel_before += lay.numel
    state.numel_after += lay.sent
    fut = torch.futures.Future(devices=[device] if device.type == "cuda" else None)
    fut.set_result(buf)
    return fut
