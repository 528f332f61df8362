"""Diagnostic runs of the tiny dVAE on the built-in shapes (see NOTES.md): what stops it from learning.

    python docs/dvae/probe.py --steps 500 [--init released] [--relax gumbel|hard|softmax|continuous]
                              [--loss logit-laplace|mse] [--lnb-min X] [--vocab N] [--lr LR] [--beta B]
                              [--centre-logits S] [--usage W] [--encoder-lr M]
                              [--dequant LEVELS] [--fixed-lnb-steps N]

Prints, every 100 updates, the training loss, the KL term, the held-out per-pixel mean absolute error of
``decode(encode(x))`` (argmax codes), the scorer's accuracy on those reconstructions and the number of codes
used. ``--relax continuous`` feeds the encoder logits straight to the decoder (no bottleneck) and reports the
error of that reconstruction instead: how fast the architecture and the likelihood learn without quantization.
``--loss mse`` replaces the logit-Laplace NLL by a squared error on ``sigmoid(mu)``; it is a comparison only.
"""
from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F

from dalle.dvae import DVAE, DVAEConfig, LOGIT_LAPLACE_EPS
from dalle.schedules import cosine
from dalle.train_dvae import TrainDVAEConfig, _Batches, _heldout, evaluate
from dalle_kernels import logit_laplace_loss, map_pixels


def build_parser():
    from dalle import cli

    p = cli.Parser(prog="python docs/dvae/probe.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=cli.positive_int, default=500, help="updates")
    p.add_argument("--batch-size", type=cli.positive_int, default=32, help="batch size")
    p.add_argument("--lr", type=cli.positive_float, default=1e-3, help="Adam step size")
    p.add_argument("--beta", type=cli.nonneg_float, default=0.1, help="KL weight")
    p.add_argument("--vocab", type=cli.int_at_least(2), default=512, help="codebook size")
    p.add_argument("--init", choices=("default", "released"), default="default",
                   help="released: conv weights N(0, 1/fan_in), zero biases, as in the released dVAE code (the "
                        "model's own init); default: PyTorch's default, logit layer scaled by 0.02 (the old init)")
    p.add_argument("--relax", choices=("gumbel", "hard", "softmax", "continuous"), default="gumbel",
                   help="what the decoder sees: a Gumbel-softmax sample, its hard one-hot, the softmax, or the "
                        "encoder logits themselves (no bottleneck)")
    p.add_argument("--loss", choices=("logit-laplace", "mse"), default="logit-laplace",
                   help="reconstruction loss (mse: a squared error on sigmoid(mu), a comparison only)")
    p.add_argument("--lnb-min", type=cli.finite_float, default=None, help="soft floor on the decoder's ln b")
    p.add_argument("--centre-logits", type=cli.nonneg_float, default=None,
                   help="Encoder.init_logits_from_data with this std (the trainer's --logit-init-std)")
    p.add_argument("--usage", type=cli.nonneg_float, default=0.0,
                   help="weight of a codebook-usage term: minus the entropy of the batch-mean posterior")
    p.add_argument("--encoder-lr", type=cli.positive_float, default=1.0,
                   help="encoder step size as a multiple of --lr")
    p.add_argument("--dequant", type=cli.nonneg_float, default=0.0,
                   help="uniform dequantization noise of the NLL target, in 8-bit levels")
    p.add_argument("--fixed-lnb-steps", type=cli.nonneg_int, default=0,
                   help="for the first N updates the NLL uses ln b = 0 (the decoder's ln b output is not used)")
    p.add_argument("--threads", type=cli.positive_int, default=1, help="torch CPU threads")
    return p


def main():
    p = build_parser()
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    cfg = TrainDVAEConfig(steps=a.steps, batch_size=a.batch_size)
    m = DVAE(DVAEConfig.tiny(vocab_size=a.vocab))  # the model's own init: the released code's
    if a.init == "default":
        # what the dVAE had before: PyTorch's default conv init, the logit layer's weights scaled by 0.02
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, torch.nn.Conv2d):
                    mod.reset_parameters()
            m.encoder.net[-1].weight.mul_(0.02)
    data = _Batches(cfg, 32)
    eval_images, eval_scenes = _heldout(cfg, 32)
    with torch.no_grad():
        x0 = map_pixels(data.batch(10**6).float() / 255, LOGIT_LAPLACE_EPS)
        lg = m.encoder(x0).permute(0, 2, 3, 1).reshape(-1, a.vocab)
        print(f"init: logit std over positions {lg.std(0).mean():.5f}, over codes {lg.std(1).mean():.5f}, "
              f"argmax codes {lg.argmax(1).unique().numel()}")
    if a.centre_logits is not None:
        m.encoder.init_logits_from_data(x0, a.centre_logits)
    groups = [{"params": m.encoder.parameters(), "mult": a.encoder_lr}, {"params": m.decoder.parameters(), "mult": 1.0}]
    opt = torch.optim.AdamW(groups, lr=a.lr, weight_decay=1e-4)
    t0 = time.time()
    for step in range(a.steps):
        for g in opt.param_groups:
            g["lr"] = g["mult"] * cosine(step, a.lr, a.lr / 100, a.steps)
        tau = cosine(step, 1.0, 1 / 16, a.steps)
        beta = cosine(step, 0.0, a.beta, max(1, a.steps // 4))
        x = data.batch(step).float() / 255
        logits = m.logits(x)
        if a.relax == "continuous":
            z = logits
        elif a.relax == "softmax":
            z = logits.softmax(1)
        else:
            z = F.gumbel_softmax(logits, tau=tau, hard=a.relax == "hard", dim=1)
        params = m.decoder(z)
        if step < a.fixed_lnb_steps:
            params = torch.cat([params[:, :3], torch.zeros_like(params[:, 3:])], 1)
        elif a.lnb_min is not None:
            params = torch.cat([params[:, :3], a.lnb_min + F.softplus(params[:, 3:] - a.lnb_min)], 1)
        if a.loss == "mse":
            nll = ((torch.sigmoid(params[:, :3]) - map_pixels(x, LOGIT_LAPLACE_EPS)) ** 2).mean()
        else:
            target = (x * 255 + a.dequant * torch.rand_like(x)) / (255 + a.dequant) if a.dequant else x
            nll = logit_laplace_loss(params, target, reduction="mean", eps=LOGIT_LAPLACE_EPS)
        log_q = F.log_softmax(logits, 1)
        kl = (log_q.exp() * (log_q + math.log(a.vocab))).sum((1, 2, 3)).mean() / x[0].numel()
        q_mean = log_q.exp().mean((0, 2, 3))
        loss = nll + beta * kl + a.usage * (q_mean * (q_mean + 1e-12).log()).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if (step + 1) % 100:
            continue
        if a.relax == "continuous":
            with torch.no_grad():
                xe = eval_images.float() / 255
                r = m.params_to_images(m.decoder(m.encoder(map_pixels(xe, LOGIT_LAPLACE_EPS))))
            print(f"{step + 1:5d} {time.time() - t0:5.0f}s loss {loss.item():7.3f} "
                  f"continuous held-out MAE {(r - xe).abs().mean().item():.4f}", flush=True)
        else:
            ev, _ = evaluate(m, eval_images, eval_scenes)
            print(f"{step + 1:5d} {time.time() - t0:5.0f}s loss {loss.item():7.3f} kl {kl.item():.4f} "
                  f"held-out MAE {ev['heldout_mae']:.4f} scorer {ev['heldout_scorer_acc']:.3f} "
                  f"codes {ev['codes_used']}", flush=True)


if __name__ == "__main__":
    main()
