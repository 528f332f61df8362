"""``dalle.plan`` and ``python -m dalle.train --plan``: counts from the meta model, formulas on a micro config
against hand-computed numbers, the CLI's table and usage errors."""
import subprocess
import sys

import pytest

from dalle.model import DALLE, DALLEConfig
from dalle.plan import meta_model, plan
from dalle.model import PRESETS
from dalle.train import main as train_main

MICRO = dict(text_len=6, text_vocab=20, image_vocab=12, grid=(4, 4), n_layers=2, n_heads=2, head_dim=16,
             conv_kernel=3)


def test_paper_count_equals_meta_model_and_is_12_3b():
    cfg = DALLEConfig(**PRESETS["paper"])
    model = meta_model(cfg)
    assert all(p.is_meta for p in model.parameters())
    n = sum(p.numel() for p in model.parameters())
    assert plan(cfg, 1, 8, 8)["n_params"] == n
    d = 3968
    # by hand: 64 blocks of 12 d^2 + 13 d; text table and head (16384 + 256 rows) each; image table and head;
    # text positions, rows, columns; the final LayerNorm
    assert n == 64 * (12 * d * d + 13 * d) + 2 * (16384 + 256) * d + 2 * 8192 * d + (256 + 32 + 32) * d + 2 * d
    assert 12.2e9 < n < 12.4e9


def test_micro_formulas_by_hand():
    cfg = DALLEConfig(**MICRO)
    got = plan(cfg, nodes=3, gpus_per_node=2, batch=12, powersgd_rank=2)
    real = DALLE(cfg)
    P = sum(p.numel() for p in real.parameters())
    d, S = 32, 6 + 16
    blk = 12 * d * d + 13 * d  # 12,704
    assert got["n_params"] == P == 2 * blk + 2 * 26 * d + 2 * 12 * d + (6 + 4 + 4) * d + 2 * d  # 28,544
    assert got["n_block_params"] == blk and got["local_batch"] == 2
    shard = P // 2
    assert (got["param_bytes"], got["master_bytes"], got["grad_bytes"], got["adam_bytes"]) == (
        2 * shard, 4 * shard, 4 * shard, 8 * shard)
    assert got["gathered_block_bytes"] == 4 * blk
    assert got["checkpoint_bytes"] == 2 * 2 * 2 * S * d  # 2 bytes x L x b x S x d
    assert got["block_recompute_bytes"] == 2 * 2 * S * d * 17
    assert got["logits_bytes"] == 4 * 2 * (5 * 26 + 16 * 12)
    assert got["intra_allgather_bytes"] == 2 * P  # 2 x (G-1)/G x 2 bytes x P with G = 2
    assert got["intra_reducescatter_bytes"] == 2 * P  # (G-1)/G x 4 bytes x P
    assert got["inter_elements"] == shard  # every dim 0 here is even
    assert got["inter_bytes"] == round(2 * 2 / 3 * 4 * shard)
    # PowerSGD: per block qkv 48x32 (rows 48, r 2: 160 sent), proj 16x32 (96), fc 64x32 (192), out 16x128 (288);
    # the 1-D tensors, embeddings and heads whole
    whole = shard - 2 * (48 * 32 + 16 * 32 + 64 * 32 + 16 * 128)
    assert got["inter_powersgd_elements"] == whole + 2 * (160 + 96 + 192 + 288)
    assert got["powersgd_saving"] == pytest.approx(1 - got["inter_powersgd_elements"] / shard)
    assert plan(cfg, 3, 2, 12)["powersgd_saving"] == 0.0
    assert got["total_bytes"] == sum(got[k] for k in ("param_bytes", "gathered_block_bytes", "master_bytes",
                                                      "grad_bytes", "adam_bytes", "checkpoint_bytes",
                                                      "block_recompute_bytes", "logits_bytes"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(nodes=0, gpus_per_node=2, batch=4), "nodes"), (dict(nodes=1, gpus_per_node=2, batch=3), "multiple"),
    (dict(nodes=1, gpus_per_node=True, batch=4), "gpus_per_node"),
    (dict(nodes=1, gpus_per_node=2, batch=4, powersgd_rank=-1), "powersgd_rank")])
def test_plan_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan(DALLEConfig(**MICRO), **kwargs)


def test_cli_prints_the_paper_plan(capsys):
    train_main(["--preset", "paper", "--plan", "--nodes", "2", "--gpus-per-node", "8", "--batch", "32",
                "--powersgd-rank", "4"])
    out = capsys.readouterr().out
    n = sum(p.numel() for p in meta_model(DALLEConfig(**PRESETS["paper"])).parameters())
    assert f"parameters: {n:,}" in out and "(12.29B" in out
    for line in ("Adam moments", "activations, checkpointed blocks", "inside the machine: reduce-scatter",
                 "between machines: all-reduce", "with PowerSGD rank 4"):
        assert line in out


@pytest.mark.parametrize("args, match", [
    (["--nodes", "2", "--gpus-per-node", "8", "--batch", "30"], "multiple of --nodes x --gpus-per-node = 16"),
    (["--nodes", "0", "--gpus-per-node", "8", "--batch", "16"], "--nodes"),
    (["--gpus-per-node", "8", "--batch", "16"], "--nodes"),
    (["--nodes", "1", "--gpus-per-node", "8", "--batch", "16", "--powersgd-rank", "-1"], "--powersgd-rank"),
    (["--nodes", "1", "--gpus-per-node", "8", "--batch", "16", "--powersgd-rank", "32"], "with one machine")])
def test_cli_usage_errors(args, match):
    r = subprocess.run([sys.executable, "-m", "dalle.train", "--preset", "paper", "--plan", *args],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stdout == ""
    lines = [l for l in r.stderr.splitlines() if l.strip()]
    assert len(lines) == 1 and match in lines[0], r.stderr
