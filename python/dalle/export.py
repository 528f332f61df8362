"""Export a run's weights from a training checkpoint to the single-file format that ``dalle.generate`` reads.

    python -m dalle.export --run runs/big                          # the newest checkpoint that verifies
    python -m dalle.export --run runs/big --checkpoint runs/big/dcp/step_00010000
    python -m dalle.export --run runs/big --dtype bf16                 # 2 bytes per weight

Reads a checkpoint written by ``python -m dalle.train`` (one process, DDP or ``--fsdp`` with any number of shards;
one process here, no GPU needed), verified against its manifest first, and writes ``RUN/model.safetensors`` +
``RUN/config.json``. The model is assembled whole in memory: about 4 bytes per parameter (49 GB for the paper's
12B). ``dalle.train --fsdp`` runs this itself when training ends; use it for a run stopped early or for an earlier
checkpoint. No code from the files runs (``dalle.checkpoint``).
"""
from __future__ import annotations

import json
from pathlib import Path

from . import checkpoint, cli
from .runs import export, file_digest


def build_parser():
    p = cli.Parser(prog="python -m dalle.export", description="Write the weights of a training checkpoint of a "
                   "transformer run (python -m dalle.train) as RUN/model.safetensors + RUN/config.json.")
    p.add_argument("--run", required=True, help="the run folder (its checkpoints are in RUN/dcp)")
    p.add_argument("--checkpoint", default=None,
                   help="one checkpoint folder (RUN/dcp/step_XXXXXXXX; default: the newest that verifies)")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="dtype of the weights written (default fp32: 16-bit checkpoints, --param-dtype, are exact "
                        "in it)")
    p.add_argument("--force", action="store_true",
                   help="overwrite RUN's model even when it is from a later step than the checkpoint")
    return p


def main(argv=None):
    p = build_parser()
    a = p.parse_args(argv)
    if a.checkpoint is not None:
        ckpt = Path(a.checkpoint)
        problem = checkpoint.verify(ckpt) if ckpt.is_dir() else "no such folder"
        if problem:
            p.error(f"argument --checkpoint: {a.checkpoint} is not a usable checkpoint ({problem})")
    else:
        ckpt, skipped = checkpoint.newest_verified(a.run)
        for folder, why in skipped:
            cli.warn(f"skipped checkpoint {folder}: {why}")
        if ckpt is None:
            p.error(f"argument --run: no checkpoint in {Path(a.run) / checkpoint.CHECKPOINT_DIR} verifies (folders "
                    f"step_XXXXXXXX written by python -m dalle.train)")
    tok = Path(a.run) / "tokenizer.json"
    try:
        saved = checkpoint.read_json(ckpt / checkpoint.TRAIN_STATE, "train state").get("identity") or {}
    except (OSError, ValueError) as e:
        p.error(f"argument --checkpoint: {e}")
    if tok.is_file() and saved.get("--tokenizer") not in (None, file_digest(tok)):
        p.error(f"argument --checkpoint: {ckpt} was trained with another tokenizer than {tok} (digest "
                f"{saved.get('--tokenizer')} -> {file_digest(tok)}): it is not a checkpoint of this run")
    config = Path(a.run) / "config.json"
    if config.is_file() and not a.force:
        try:
            have = json.loads(config.read_text()).get("step")
            want = checkpoint.read_json(ckpt / checkpoint.TRAIN_STATE, "train state")["step"]
        except (OSError, ValueError, KeyError, TypeError):
            have = want = None
        if isinstance(have, int) and isinstance(want, int) and have > want:
            p.error(f"argument --run: {config} is the model of step {have}, later than the checkpoint's step {want} "
                    f"({ckpt}); --force to overwrite it")
    try:
        export(a.run, ckpt, dtype=a.dtype)
    except ValueError as e:
        p.error(f"argument --checkpoint: {e}")


if __name__ == "__main__":
    main()
