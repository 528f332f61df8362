"""Every mask compared, whole dense matrix, against a worked example written out by hand and an independent predicate."""
import pytest
import torch

from dalle_kernels import masks

# T = 6, 4 x 4 grid, 3 x 3 conv: image keys allowed for each image query.
SPEC_TABLE = {
    "row": [list(range(max(0, q - 4), q + 1)) for q in range(16)],
    "column": [list(range(q % 4, q + 1, 4)) for q in range(16)],
    "conv": [[0], [0, 1], [1, 2], [0, 2, 3], [0, 1, 3, 4], [0, 1, 2, 4, 5], [1, 2, 3, 5, 6],
             [0, 2, 3, 4, 6, 7], [1, 3, 4, 5, 7, 8], [2, 4, 5, 6, 8, 9], [3, 5, 6, 7, 9, 10],
             [4, 6, 7, 8, 10, 11], [5, 7, 8, 9, 11, 12], [6, 8, 9, 10, 12, 13], [7, 9, 10, 11, 13, 14],
             [8, 10, 11, 12, 14, 15]],
}


def test_spec_row_table_literal():
    # The row entries of the table, written out, so the comprehension above is itself checked.
    assert SPEC_TABLE["row"][5] == [1, 2, 3, 4, 5] and SPEC_TABLE["row"][3] == [0, 1, 2, 3]
    assert SPEC_TABLE["column"][13] == [1, 5, 9, 13]


@pytest.mark.parametrize("name", ["row", "column", "conv"])
def test_spec_worked_example(name):
    T, H, W = 6, 4, 4
    m = masks.dense_mask(name, T, (H, W), kernel=3)
    expected = torch.zeros(T + 16, T + 16, dtype=torch.bool)
    for i in range(T):
        expected[i, : i + 1] = True
    for q, keys in enumerate(SPEC_TABLE[name]):
        expected[T + q, :T] = True
        for k in keys:
            expected[T + q, T + k] = True
    assert torch.equal(m, expected), (m ^ expected).nonzero()[:10]


def independent(name, T, H, W, kernel, i, j):
    """A second, loop-based reading of the masks' rules (README: The masks), written independently of masks.allowed."""
    if j > i:
        return False
    if i < T:
        return True  # text -> text causal (j <= i already)
    if j < T:
        return True  # every image query sees every text slot
    q, k = i - T, j - T
    rq, cq, rk, ck = q // W, q % W, k // W, k % W
    s = kernel // 2
    if name == "causal":
        return True
    if name == "row":
        return q - k <= W
    if name == "column":
        return cq == ck
    if name == "conv":
        # figure 11(d): left half (columns c-s..c) covers rows r-s..r, right half (c+1..c+s) rows
        # r-s-1..r-1, wrapping in flattened order: walk the window and wrap like the flattened index.
        for dr in range(0, s + 2):
            for dc in range(-s, s + 1):
                if dc <= 0 and dr > s:
                    continue
                if dc > 0 and (dr < 1 or dr > s + 1):
                    continue
                if q - (dr * W - dc) == k:
                    return True
        return False
    if name == "conv_clipped":
        return abs(rq - rk) <= s and abs(cq - ck) <= s
    if name == "conv_torus":
        # ru-dalle v2: the kernel x kernel window around the key, each axis taken modulo the grid; the query
        # must be one of its cells (and at or after the key in raster order: j <= i above).
        for dr in range(-s, s + 1):
            for dc in range(-s, s + 1):
                if ((rk + dr) % H) * W + (ck + dc) % W == q:
                    return True
        return False
    if name == "axial_row":
        # DALLE-pytorch axial_row: the query's own image row, keys at or left of its column.
        return rq == rk and ck <= cq
    raise AssertionError(name)


CASES = [(1, 5, 3, 3), (7, 7, 9, 5), (20, 4, 4, 11), (3, 6, 13, 11), (13, 8, 8, 3), (0, 5, 5, 5), (11, 3, 12, 1),
         (7, 5, 3, 3), (7, 5, 3, 5), (7, 5, 3, 11), (7, 7, 9, 3), (7, 7, 9, 11), (2, 12, 13, 11)]


@pytest.mark.parametrize("name", masks.MASKS)
@pytest.mark.parametrize("T,H,W,kernel", CASES)
def test_against_independent_predicate(name, T, H, W, kernel):
    if name == "conv" and kernel // 2 >= W:
        pytest.skip("a conv half-width >= W makes the wrap rule ambiguous; not a DALL-E shape")
    n = T + H * W
    expected = torch.tensor([[independent(name, T, H, W, kernel, i, j) for j in range(n)] for i in range(n)])
    got = masks.dense_mask(name, T, (H, W), kernel)
    assert torch.equal(got, expected), (got ^ expected).nonzero()[:10]


# Hand-derived entries for the two masks of other implementations, T = 6, 4 x 4 grid, 3 x 3 window (s = 1).
# conv_torus, q = 15 (row 3, column 3): rows 2, 3 and 0 (wrapped), columns 2, 3 and 0 (wrapped), all earlier.
# q = 12 (row 3, column 0): rows 2, 3, 0 and columns 3, 0, 1; in its own row only 12 itself is not later.
OTHER_IMPLEMENTATIONS = {
    "conv_torus": {0: [0], 1: [0, 1], 4: [0, 1, 3, 4], 7: [0, 2, 3, 4, 6, 7], 12: [0, 1, 3, 8, 9, 11, 12],
                   15: [0, 2, 3, 8, 10, 11, 12, 14, 15]},
    "axial_row": {0: [0], 3: [0, 1, 2, 3], 4: [4], 9: [8, 9], 15: [12, 13, 14, 15]},
}


@pytest.mark.parametrize("name", sorted(OTHER_IMPLEMENTATIONS))
def test_other_implementations_literal_entries(name):
    T = 6
    m = masks.dense_mask(name, T, (4, 4), kernel=3)
    for q, keys in OTHER_IMPLEMENTATIONS[name].items():
        assert m[T + q, T:].nonzero().flatten().tolist() == keys, (name, q)
        assert m[T + q, :T].all()


def rudalle_v2_conv_mask(T, H, W, kernel):
    """ru-dalle's v2 ``get_conv_mask`` (rudalle/dalle/image_attention.py) step by step, as a whole matrix: start
    from the lower triangle; per image key column ``pos`` drop every later query, then re-allow the later queries
    inside the ``kernel`` x ``kernel`` window around the key with both axes wrapped (ru-dalle: square grid,
    ``% image_tokens_per_dim``; here rows ``% H`` and columns ``% W``)."""
    n = T + H * W
    s = kernel // 2
    mask = torch.ones(n, n, dtype=torch.bool).tril()
    for pos in range(T, n):
        mask[pos + 1:, pos] = False
        row, col = (pos - T) // W, (pos - T) % W
        for r in range(-s, s + 1):
            for c in range(-s, s + 1):
                cell = T + ((row + r) % H) * W + (col + c) % W
                if cell > pos:
                    mask[cell, pos] = True
    return mask


def dalle_pytorch_axial_row_mask(T, H, W):
    """DALLE-pytorch's ``axial_row`` as a whole matrix: every query sees every text column, each image row block
    sees itself (``Transformer._get_attention_mask``), and the attention applies causality on top."""
    n = T + H * W
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, :T] = True
    for row in range(H):
        begin, end = T + row * W, T + (row + 1) * W
        mask[begin:end, begin:end] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


def rudalle_row_col_masks(T, H, W):
    """ru-dalle's ``get_row_mask`` and ``get_col_mask`` step by step: from the lower triangle, per image key
    column drop the queries more than ``W`` later (row), or those not a multiple of ``W`` later (column)."""
    n = T + H * W
    row = torch.ones(n, n, dtype=torch.bool).tril()
    col = row.clone()
    for pos in range(T, n):
        row[pos + W + 1:, pos] = False
        for i in range(1, n, W):
            col[pos + i: pos + i + W - 1, pos] = False
    return row, col


def dalle_pytorch_axial_col_mask(T, H, W):
    """DALLE-pytorch's ``axial_col`` static mask (every text column, each image column with itself) and causality."""
    n = T + H * W
    mask = torch.zeros(n, n, dtype=torch.bool)
    mask[:, :T] = True
    for c in range(W):
        idx = torch.arange(T + c, n, W)
        mask[idx[:, None], idx[None, :]] = True
    return mask & torch.ones(n, n, dtype=torch.bool).tril()


@pytest.mark.parametrize("T,H,W,kernel", [(256, 32, 32, 11), (7, 5, 3, 3), (7, 5, 3, 5), (7, 7, 9, 11), (0, 9, 7, 5),
                                          (3, 4, 4, 11), (1, 1, 6, 3)])
def test_equal_to_reference_constructions(T, H, W, kernel):
    assert torch.equal(masks.dense_mask("conv_torus", T, (H, W), kernel), rudalle_v2_conv_mask(T, H, W, kernel))
    assert torch.equal(masks.dense_mask("axial_row", T, (H, W), kernel), dalle_pytorch_axial_row_mask(T, H, W))
    row, col = rudalle_row_col_masks(T, H, W)
    assert torch.equal(masks.dense_mask("row", T, (H, W), kernel), row)
    assert torch.equal(masks.dense_mask("column", T, (H, W), kernel), col)
    assert torch.equal(masks.dense_mask("column", T, (H, W), kernel), dalle_pytorch_axial_col_mask(T, H, W))


def test_conv_torus_key_counts_paper_grid():
    # 61 image keys away from the edges (as conv_clipped), up to 66 in the last 5 columns (wrapped columns of the
    # same rows), up to 121 = 11 * 11 in the last 5 rows (wrapped top rows); the first query sees only itself.
    counts = masks.dense_mask("conv_torus", 0, (32, 32), 11).sum(dim=1).view(32, 32)
    assert int(counts[10, 16]) == 61 and int(counts[10, 31]) == 66 and int(counts[10, 0]) == 56
    assert int(counts[31, 31]) == 121 and int(counts.max()) == 121 and int(counts[0, 0]) == 1
    assert int(counts[5:27, 5:27].min()) == int(counts[5:27, 5:27].max()) == 61
    axial = masks.dense_mask("axial_row", 0, (32, 32), 11).sum(dim=1).view(32, 32)
    assert torch.equal(axial, torch.arange(1, 33).expand(32, 32))


def test_interior_key_counts_paper_grid():
    # Keys for an interior query on a 32 x 32 grid: row 33, column up to 32, conv 66.
    T, H, W = 0, 32, 32
    q = 20 * W + 16
    for name, count in (("row", 33), ("conv", 66), ("conv_clipped", 61)):
        m = masks.dense_mask(name, T, (H, W))
        assert int(m[q].sum()) == count, name
    col = masks.dense_mask("column", T, (H, W))
    assert int(col[(H - 1) * W + 5].sum()) == 32


def test_column_transposed_layout_is_block_diagonal():
    for T, H, W in [(6, 4, 4), (3, 5, 7), (0, 3, 2)]:
        perm = masks.column_permutation(T, (H, W))
        raster = masks.dense_mask("column", T, (H, W))
        assert torch.equal(raster[perm][:, perm], masks.transposed_column_mask(T, (H, W)))
        assert sorted(perm.tolist()) == list(range(T + H * W))


@pytest.mark.parametrize("bad,match", [
    (dict(mask="diag"), "mask"), (dict(kernel=4), "kernel"), (dict(kernel=0), "kernel"),
    (dict(grid=(0, 4)), "grid"), (dict(grid=4), "grid"), (dict(text_len=-1), "text_len"),
    (dict(grid=(4.7, 2.2)), "grid"), (dict(grid=("4", "2")), "grid"), (dict(grid=(3, 3, 1)), "grid"),
    (dict(grid=(True, 3)), "grid"),
])
def test_bad_arguments(bad, match):
    args = dict(mask="row", text_len=4, grid=(3, 3), kernel=3) | bad
    with pytest.raises(ValueError, match=match):
        masks.dense_mask(args["mask"], args["text_len"], args["grid"], args["kernel"])


def test_integer_scalars_are_accepted_as_grid():
    import numpy as np

    for grid in [(np.int64(3), 4), (torch.tensor(3), torch.tensor(4)), [3, 4]]:
        assert masks.check_layout("row", 2, grid) == (2, 3, 4)


def test_every_mask_is_causal_and_sees_text():
    T, H, W = 5, 6, 7
    for name in masks.MASKS:
        m = masks.dense_mask(name, T, (H, W), 5)
        assert not torch.triu(m, diagonal=1).any(), name
        assert m.diagonal().all(), name
        assert m[T:, :T].all() and not m[:T, T:].any(), name
        assert torch.equal(m[:T, :T], torch.ones(T, T, dtype=torch.bool).tril()), name


@pytest.mark.parametrize("name", masks.MASKS)
def test_scalar_query_rows_equal_dense_rows(name):
    # The sampler asks for one query's keys with a Python int i and a tensor of j (dalle.sampling).
    T, H, W, kernel = 3, 5, 4, 3
    dense = masks.dense_mask(name, T, (H, W), kernel)
    for i in range(T + H * W):
        j = torch.arange(i + 1)
        row = masks.allowed(name, i, j, T, H, W, kernel)
        assert torch.equal(row, dense[i, : i + 1]), (name, i)


@pytest.mark.parametrize("name", ["conv_torus", "axial_row"])
def test_model_accepts_new_masks(name):
    from dalle.model import DALLEConfig

    cfg = DALLEConfig.micro(last_mask=name)
    assert cfg.masks()[-1] == name
