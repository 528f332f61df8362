"""DALL-E's sparse causal attention masks as predicates (paper appendix B.1).

Positions: ``T`` text slots, then an ``H x W`` image grid in raster order. ``i`` is a query position,
``j`` a key position. Every predicate here is written with operators only (``//``, ``%``, ``&``, ``|``,
comparisons), so the same function body works on Python ints, NumPy arrays and torch tensors.
``dense_mask`` is the definition every backend must match.

Image query ``q`` at grid row ``r = q // W``, column ``c = q % W``; image key ``k`` at ``r', c'``; ``s = kernel // 2``.
Every image -> image rule includes ``k <= q`` (raster order). Text attends causally to text, and every image
query attends every text slot (all masks alike, including the two from other implementations below).

- ``row``: ``0 <= q - k <= W`` (the previous ``W`` tokens and itself, wrapping across rows).
- ``column``: ``c' == c`` (same column, this row and above).
- ``conv``: with ``d = q - k >= 0``: ``d // W <= s`` and (``d % W <= s`` or ``d % W >= W - s``); the paper's
  figure 11(d), a causal window with wraparound in flattened order (66 keys for an interior query at 32 x 32).
- ``conv_clipped``: ``|r - r'| <= s`` and ``|c - c'| <= s``, no wrap (61 keys for an interior query at 32 x 32,
  11 x 11). ru-dalle's ``v3`` convolutional mask (``get_conv_mask(..., hf_version="v3")``, clamped window
  ``max(min(r + row, n - 1), 0)``), used by its current checkpoints.
- ``conv_torus``: ``(r - r') mod H`` in ``{0..s} U {H-s..H-1}`` and ``(c - c') mod W`` in ``{0..s} U {W-s..W-1}``:
  the ``kernel x kernel`` window wrapped around both grid axes (a torus), causal in raster order. ru-dalle's
  ``v2`` convolutional mask, used by its older checkpoints: ``rudalle/dalle/image_attention.py`` (repository
  ai-forever/ru-dalle), ``get_conv_mask`` starts from ``torch.tril`` (so text is causal and every image row
  sees all text columns), then for each image key column ``pos`` clears every later query
  (``mask[pos+1:, pos] = 0``, keeping the diagonal) and re-allows the queries
  ``text_tokens + r_abs * n + c_abs > pos`` with ``r_abs = (r + row) % n``, ``c_abs = (c + col) % n`` for
  ``r, c`` in ``-s..s`` around the key (``n`` = ``image_tokens_per_dim``, a square grid; here rows wrap
  modulo ``H`` and columns modulo ``W``). The window is symmetric, so "around the key" equals "around the
  query". At 32 x 32, 11 x 11 a query away from the grid's edges sees 61 image keys, like ``conv_clipped``; one in
  the last ``s`` columns also sees the wrapped first columns of its rows (up to 66), and one in the last ``s``
  rows also sees the wrapped top rows: up to ``kernel**2`` = 121 keys (the last query).
- ``axial_row``: ``r' == r`` (the query's own image row, this column and left of it; no wrap).
  DALLE-pytorch's ``axial_row`` (repository lucidrains/DALLE-pytorch, ``dalle_pytorch/attention.py``,
  ``SparseAxialCausalAttention`` with ``axis=0``: image queries split into rows ``'b (h w) c -> b h w c'``,
  keys of the same row under ``triu_(1)`` causality, concatenated with every text key; the static mask
  ``Transformer._get_attention_mask('axial_row')`` of ``dalle_pytorch/transformer.py``, combined with causality,
  is the same matrix). Text queries attend causally to text only.
- ``causal``: ``k <= q`` (the dense baseline).
"""
from __future__ import annotations

import numpy as np
import torch

MASKS = ("row", "column", "conv", "conv_clipped", "conv_torus", "axial_row", "causal")


def _is_int(x) -> bool:
    if isinstance(x, torch.Tensor):
        return x.numel() == 1 and not x.is_floating_point() and not x.is_complex() and x.dtype != torch.bool
    return not isinstance(x, bool) and isinstance(x, (int, np.integer))


def check_layout(mask: str, text_len: int, grid, kernel: int = 11) -> tuple[int, int, int]:
    """Validate the mask arguments; return ``(text_len, H, W)``."""
    if not isinstance(mask, str) or mask not in MASKS:
        raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")
    if isinstance(text_len, bool) or not isinstance(text_len, (int, np.integer)) or text_len < 0:
        raise ValueError(f"text_len must be a non-negative int, got {text_len!r}")
    try:
        pair = tuple(grid)
    except TypeError:
        pair = ()
    # Ints only (a torch/NumPy integer scalar too): 4.7 or "4" would otherwise be truncated or parsed.
    if len(pair) != 2 or not all(_is_int(g) for g in pair) or min(int(g) for g in pair) <= 0:
        raise ValueError(f"grid must be a pair (H, W) of positive ints, got {grid!r}")
    H, W = (int(g) for g in pair)
    if isinstance(kernel, bool) or not isinstance(kernel, (int, np.integer)) or kernel <= 0 or kernel % 2 == 0:
        raise ValueError(f"kernel must be a positive odd int, got {kernel!r}")
    return int(text_len), H, W


def image_allowed(mask: str, q, k, H: int, W: int, kernel: int = 11):
    """Image query raster index ``q`` may attend image key raster index ``k`` (both >= 0)."""
    s = kernel // 2
    if mask == "row":
        d = q - k
        return (d >= 0) & (d <= W)
    if mask == "column":
        return (k % W == q % W) & (k <= q)
    if mask == "conv":
        d = q - k
        dm = d % W
        return (d >= 0) & (d // W <= s) & ((dm <= s) | (dm >= W - s))
    if mask == "conv_clipped":
        dr = q // W - k // W
        dc = q % W - k % W
        return (k <= q) & (dr <= s) & (dc <= s) & (dc >= -s)
    if mask == "conv_torus":
        # Circular distances along both axes; ``%`` is the floor modulo (non-negative) on ints, NumPy and torch.
        dr = (q // W - k // W) % H
        dc = (q % W - k % W) % W
        return (k <= q) & ((dr <= s) | (dr >= H - s)) & ((dc <= s) | (dc >= W - s))
    if mask == "axial_row":
        return (k <= q) & (q // W == k // W)
    if mask == "causal":
        return k <= q
    raise ValueError(f"mask must be one of {MASKS}, got {mask!r}")


def allowed(mask: str, i, j, text_len: int, H: int, W: int, kernel: int = 11):
    """Sequence position ``i`` may attend position ``j`` under ``mask`` (raster image order)."""
    T = text_len
    causal = j <= i
    if mask == "causal":
        return causal
    i_img = i >= T
    j_txt = j < T
    # Clamp the raster indices to 0 where they do not apply so the image rule never sees negatives.
    q = (i - T) * i_img
    k = (j - T) * (j >= T)
    img = image_allowed(mask, q, k, H, W, kernel)
    return (j_txt & causal) | (i_img & ~j_txt & img)


def dense_mask(mask: str, text_len: int, grid, kernel: int = 11, device=None) -> torch.Tensor:
    """The ``(N, N)`` bool matrix (True = attend), ``N = text_len + H * W``, raster image order."""
    T, H, W = check_layout(mask, text_len, grid, kernel)
    n = T + H * W
    idx = torch.arange(n, device=device)
    return allowed(mask, idx[:, None], idx[None, :], T, H, W, kernel)


def column_permutation(text_len: int, grid, device=None) -> torch.Tensor:
    """``perm`` with ``x_t = x[..., perm, :]`` putting the image part in column-major order.

    Transposed position ``T + c * H + r`` holds raster position ``T + r * W + c``; text is unchanged.
    In that layout the ``column`` mask is block-diagonal causal with blocks of ``H`` (paper appendix B.1).
    """
    T = int(text_len)
    H, W = (int(g) for g in grid)
    t = torch.arange(H * W, device=device)
    raster = (t % H) * W + t // H
    return torch.cat([torch.arange(T, device=device), T + raster])


def transposed_column_mask(text_len: int, grid, device=None) -> torch.Tensor:
    """The ``column`` mask in the transposed (column-major image) layout the kernels run."""
    T, H, W = check_layout("column", text_len, grid)
    n = T + H * W
    idx = torch.arange(n, device=device)
    i, j = idx[:, None], idx[None, :]
    causal = j <= i
    ti, tj = i - T, j - T
    img = (ti // H == tj // H) & causal
    return (j < T) & causal | ((i >= T) & (j >= T) & img)


# ----------------------------------------------------------------------------------------------------------------
# The layout the kernels run, block lookup tables, tile counts.

# The masks that skip work (all but the dense baseline), in the order tables list them.
SPARSE_MASKS = tuple(m for m in MASKS if m != "causal")
# Masks that do not depend on ``kernel``.
KERNEL_FREE_MASKS = ("row", "column", "axial_row", "causal")

# Mask codes shared with the Triton predicate (``tl_allowed``). ``column`` runs in the transposed layout.
MASK_CODES = {"causal": 0, "row": 1, "column": 2, "conv": 3, "conv_clipped": 4, "conv_torus": 5, "axial_row": 6}


def kernel_mask(mask: str, text_len: int, grid, kernel: int = 11, device=None) -> torch.Tensor:
    """``dense_mask`` in the layout the kernels run: raster order, except ``column`` (transposed image part)."""
    if mask == "column":
        return transposed_column_mask(text_len, grid, device=device)
    return dense_mask(mask, text_len, grid, kernel, device=device)


def tile_any_all(m: torch.Tensor, block_m: int, block_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tile-level OR and AND of a bool ``(N, N)`` matrix; tiles reaching past ``N`` are never "all"."""
    n = m.shape[0]
    nqb, nkb = -(-n // block_m), -(-n // block_n)
    pad = torch.zeros(nqb * block_m, nkb * block_n, dtype=torch.bool, device=m.device)
    pad[:n, :n] = m
    tiles = pad.view(nqb, block_m, nkb, block_n)
    any_ = tiles.any(dim=3).any(dim=1)
    all_ = tiles.all(dim=3).all(dim=1)
    return any_, all_


class BlockTables:
    """Which key blocks each query block visits (and the transpose), as int32 tables for the kernels.

    ``q_lut[m, :q_count[m]]``: key-block indices visited by query block ``m`` in increasing order;
    ``q_full[m, i]`` is 1 when that tile is entirely allowed and inside the sequence (the kernel skips the
    predicate there). ``k_lut``/``k_full``/``k_count``: the same per key block (the query blocks that see it),
    for the dK/dV pass. Unused entries are 0. Built from the dense mask in the kernel's layout.
    """

    def __init__(self, any_: torch.Tensor, all_: torch.Tensor, block_m: int, block_n: int):
        self.block_m, self.block_n = block_m, block_n
        self.tiles = any_
        self.q_lut, self.q_full, self.q_count = self._pack(any_, all_)
        self.k_lut, self.k_full, self.k_count = self._pack(any_.t(), all_.t())

    @staticmethod
    def _pack(any_, all_):
        count = any_.sum(dim=1).to(torch.int32)
        width = max(int(count.max()) if count.numel() else 0, 1)
        lut = torch.zeros(any_.shape[0], width, dtype=torch.int32)
        full = torch.zeros(any_.shape[0], width, dtype=torch.int32)
        for r in range(any_.shape[0]):
            idx = any_[r].nonzero().flatten()
            lut[r, : idx.numel()] = idx.to(torch.int32)
            full[r, : idx.numel()] = all_[r, idx].to(torch.int32)
        return lut, full, count

    def to(self, device) -> "BlockTables":
        out = object.__new__(BlockTables)
        out.__dict__.update({k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in self.__dict__.items()})
        return out

    @property
    def visited(self) -> int:
        return int(self.q_count.sum())

    @property
    def full(self) -> int:
        return int(self.q_full.sum())


_TABLE_CACHE: dict = {}


def block_tables(mask: str, text_len: int, grid, kernel: int, block_m: int, block_n: int, device=None) -> BlockTables:
    """Cached ``BlockTables`` per ``(mask, T, H, W, kernel, block_m, block_n, device)``."""
    T, H, W = check_layout(mask, text_len, grid, kernel)
    if mask in KERNEL_FREE_MASKS:
        kernel = 0  # the kernel size does not change these masks: one cache entry
    dev = torch.device(device) if device is not None else torch.device("cpu")
    key = (mask, T, H, W, kernel, int(block_m), int(block_n), str(dev))
    tables = _TABLE_CACHE.get(key)
    if tables is None:
        cpu_key = key[:-1] + ("cpu",)
        tables = _TABLE_CACHE.get(cpu_key)
        if tables is None:
            any_, all_ = tile_any_all(kernel_mask(mask, T, (H, W), kernel or 1), block_m, block_n)
            tables = _TABLE_CACHE[cpu_key] = BlockTables(any_, all_, block_m, block_n)
        if dev.type != "cpu":
            tables = _TABLE_CACHE[key] = tables.to(dev)
    return tables


def tile_stats(mask: str, text_len: int, grid, kernel: int = 11, block_m: int = 64, block_n: int = 64) -> dict:
    """Tiles a block-sparse kernel visits under ``mask`` vs a dense causal kernel with the same tiles."""
    tables = block_tables(mask, text_len, grid, kernel, block_m, block_n)
    causal = block_tables("causal", text_len, grid, kernel, block_m, block_n)
    return {"mask": mask, "block_m": block_m, "block_n": block_n, "tiles": tables.visited,
            "full_tiles": tables.full, "causal_tiles": causal.visited,
            "ratio": tables.visited / causal.visited}


# ----------------------------------------------------------------------------------------------------------------
# The same predicate inside Triton kernels (on int32 index tensors, in the kernel's layout).
try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    triton = None

if triton is not None:

    @triton.jit
    def tl_allowed(i, j, T, H, W, S, MASK: tl.constexpr):
        """``allowed`` for positions ``i`` (query) and ``j`` (key) in the kernel's layout; ``MASK`` a MASK_CODES value.

        For ``column`` (code 2) the image part is transposed (``t = c * H + r``) and the rule is
        block-diagonal causal with blocks of ``H``. Every ``//`` and ``%`` sees non-negative operands, so
        C (GPU) and floor (interpreter) division agree. Called with ``i`` of shape (BLOCK_M, 1) and ``j`` of
        shape (1, BLOCK_N), the divisions run per row and per column, and only adds and compares per pair.
        """
        causal = j <= i
        if MASK == 0:
            res = causal
        else:
            q = tl.maximum(i - T, 0)
            k = tl.maximum(j - T, 0)
            if MASK == 1:
                img = (q - k) <= W
            elif MASK == 2:
                img = (q // H) == (k // H)
            elif MASK == 3:
                # d = q - k, d // W and d % W from row/column parts, so that the only divisions run on the
                # (BLOCK, 1) and (1, BLOCK) index vectors, never per pair: dc < 0 borrows one row.
                rq = q // W
                rk = k // W
                dc = (q - rq * W) - (k - rk * W)
                borrow = dc < 0
                dm = tl.where(borrow, dc + W, dc)
                img = ((rq - rk) - borrow.to(tl.int32) <= S) & ((dm <= S) | (dm >= W - S))
            elif MASK == 4:
                dc = (q % W) - (k % W)
                img = ((q // W) - (k // W) <= S) & (dc <= S) & (dc >= -S)
            elif MASK == 5:
                # conv_torus. Where the pair is causal the row distance is already in 0..H-1; the column
                # distance is brought into 0..W-1 by one add, not a per-pair modulo.
                dr = (q // W) - (k // W)
                dc = (q % W) - (k % W)
                dcm = tl.where(dc < 0, dc + W, dc)
                img = ((dr <= S) | (dr >= H - S)) & ((dcm <= S) | (dcm >= W - S))
            else:
                img = (q // W) == (k // W)
            res = causal & ((j < T) | ((i >= T) & img))
        return res


# ----------------------------------------------------------------------------------------------------------------
# Pictures: one PNG per mask (Pillow), text/image boundary and the kernel's tiles visible.

PNG_CELL = 16  # pixels per position in the small views
PNG_MARGIN = 4
PNG_COLORS = {"text": (38, 110, 200), "image": (230, 120, 30), "off": (255, 255, 255),
              "visited": (222, 222, 222), "grid": (90, 90, 90), "boundary": (200, 0, 0)}
# (text_len, (H, W), kernel, tile): the worked example of README's The masks, then a paper-like view.
PNG_SIZES = [(6, (4, 4), 3, 8), (16, (16, 16), 11, 16)]


def draw_mask(mask: str, text_len: int, grid, kernel: int = 11, tile: int = 16, cell: int | None = None,
              transposed: bool = False):
    """A PIL image of the mask: row = query, column = key; allowed pairs blue (key is text) or orange (image),
    forbidden pairs grey inside a tile the block-sparse kernel visits and white in a skipped tile; tile lines
    in dark grey and the text/image boundary in red. ``transposed`` draws ``column`` in the kernel's layout."""
    from PIL import Image, ImageDraw

    T, H, W = check_layout(mask, text_len, grid, kernel)
    n = T + H * W
    m = transposed_column_mask(T, (H, W)) if transposed else dense_mask(mask, T, (H, W), kernel)
    visited, _ = tile_any_all(kernel_mask(mask, T, (H, W), kernel) if transposed or mask != "column" else m,
                              tile, tile)
    cell = cell or (PNG_CELL if n <= 64 else max(2, 800 // n))
    size = 2 * PNG_MARGIN + n * cell
    pixels = np.empty((n, n, 3), dtype=np.uint8)
    allowed_np = m.numpy()
    vis = visited.repeat_interleave(tile, 0).repeat_interleave(tile, 1)[:n, :n].numpy()
    key_text = np.arange(n)[None, :] < T
    pixels[:] = PNG_COLORS["off"]
    pixels[vis] = PNG_COLORS["visited"]
    pixels[allowed_np & key_text] = PNG_COLORS["text"]
    pixels[allowed_np & ~key_text] = PNG_COLORS["image"]
    big = pixels.repeat(cell, 0).repeat(cell, 1)
    img = Image.new("RGB", (size, size), (255, 255, 255))
    img.paste(Image.fromarray(big), (PNG_MARGIN, PNG_MARGIN))
    draw = ImageDraw.Draw(img)
    end = PNG_MARGIN + n * cell
    for b in range(0, n + 1, tile):
        p = PNG_MARGIN + b * cell
        draw.line([(p, PNG_MARGIN), (p, end)], fill=PNG_COLORS["grid"])
        draw.line([(PNG_MARGIN, p), (end, p)], fill=PNG_COLORS["grid"])
    if 0 < T < n:
        p = PNG_MARGIN + T * cell
        draw.line([(p, PNG_MARGIN), (p, end)], fill=PNG_COLORS["boundary"], width=max(1, cell // 4))
        draw.line([(PNG_MARGIN, p), (end, p)], fill=PNG_COLORS["boundary"], width=max(1, cell // 4))
    return img


def save_mask_pngs(out_dir, sizes=None, names=MASKS):
    """Write ``<mask>.png`` for the first size, ``<mask>_t<T>_<H>x<W>.png`` for the others, and the kernel
    layout of ``column`` as ``column_transposed*.png``. Returns the paths."""
    from pathlib import Path

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for idx, (T, (H, W), kernel, tile) in enumerate(sizes or PNG_SIZES):
        suffix = "" if idx == 0 else f"_t{T}_{H}x{W}"
        for name in names:
            views = [(name, False)] + ([("column_transposed", True)] if name == "column" else [])
            for label, transposed in views:
                path = out / f"{label}{suffix}.png"
                draw_mask(name, T, (H, W), kernel, tile, transposed=transposed).save(path)
                paths.append(path)
    return paths


def _parser():
    from ._cli import Parser, positive_int

    parser = Parser(prog="python -m dalle_kernels masks",
                    description="Draw DALL-E's attention masks as PNGs, or count kernel tiles.")
    parser.add_argument("--out", help="folder for the PNGs (text length 6, 4x4 grid, 3x3 conv; and text length "
                                      "16, 16x16 grid, 11x11 conv)")
    parser.add_argument("--tiles", action="store_true",
                        help="print tiles visited per mask vs dense causal at the paper shape (T=256, 32x32)")
    parser.add_argument("--block", type=positive_int, nargs=2, action="append", metavar=("BM", "BN"),
                        help="tile shape for --tiles (repeatable; default: 128 128, 64 64, 64 32)")
    return parser


def _main(argv=None):
    from pathlib import Path

    parser = _parser()
    args = parser.parse_args(argv)
    if args.block and not args.tiles:
        parser.error("argument --block: sets the tiles of --tiles; give --tiles too")
    if not args.out and not args.tiles:
        parser.error("give --out DIR and/or --tiles")
    if args.out is not None and (not args.out or Path(args.out).exists() and not Path(args.out).is_dir()):
        parser.error(f"argument --out: expected a folder, got {args.out!r}")
    if args.out:
        for path in save_mask_pngs(args.out):
            print(path)
    if args.tiles:
        print("| tiles (q x k) | mask | tiles visited | of which full | dense causal tiles | ratio |")
        print("| --- | --- | --- | --- | --- | --- |")
        for bm, bn in args.block or [(128, 128), (64, 64), (64, 32)]:
            for name in SPARSE_MASKS:
                s = tile_stats(name, 256, (32, 32), 11, bm, bn)
                print(f"| {bm} x {bn} | {name} | {s['tiles']} | {s['full_tiles']} | {s['causal_tiles']} | "
                      f"{s['ratio']:.3f} |")


if __name__ == "__main__":
    _main()
