"""Export a sharded run's weights to the single-file format that ``dalle.generate`` reads.

    python -m dalle.export --run runs/big                          # the newest checkpoint in RUN/dcp
    python -m dalle.export --run runs/big --checkpoint runs/big/dcp/step_00010000

Reads a Torch Distributed Checkpoint written by ``python -m dalle.train --fsdp`` (any number of shards, one
process, no GPU needed) and writes ``RUN/model.safetensors`` + ``RUN/config.json``. The model is assembled whole
in memory: about 4 bytes per parameter (49 GB for the paper's 12B). ``dalle.train --fsdp`` runs this itself when
training ends; use it for a run stopped early or for an earlier checkpoint. No code from the files runs
(``dalle.fsdp.safe_reader``).
"""
from __future__ import annotations

import json
from pathlib import Path


def build_parser():
    from . import cli

    p = cli.Parser(prog="python -m dalle.export", description="Write the weights of a sharded training run "
                   "(python -m dalle.train --fsdp) as RUN/model.safetensors + RUN/config.json.")
    p.add_argument("--run", required=True, help="the run folder (its sharded checkpoints are in RUN/dcp)")
    p.add_argument("--checkpoint", default=None,
                   help="one checkpoint folder (RUN/dcp/step_XXXXXXXX; default: the newest)")
    p.add_argument("--force", action="store_true",
                   help="overwrite RUN's model even when it is from a later step than the checkpoint")
    return p


def main(argv=None):
    from .fsdp import CHECKPOINT_DIR, TRAIN_STATE, checkpoints, export

    p = build_parser()
    a = p.parse_args(argv)
    found = checkpoints(a.run)
    if a.checkpoint is not None:
        if not (Path(a.checkpoint) / TRAIN_STATE).is_file():
            p.error(f"argument --checkpoint: {a.checkpoint} is not a complete sharded checkpoint (no {TRAIN_STATE})")
    elif not found:
        p.error(f"argument --run: no complete sharded checkpoint in {Path(a.run) / CHECKPOINT_DIR} (folders "
                f"step_XXXXXXXX written by python -m dalle.train --fsdp)")
    ckpt = Path(a.checkpoint) if a.checkpoint is not None else found[-1]
    config = Path(a.run) / "config.json"
    if config.is_file() and not a.force:
        try:
            have = json.loads(config.read_text()).get("step")
            want = json.loads((ckpt / TRAIN_STATE).read_text())["step"]
        except (OSError, ValueError, KeyError, TypeError):
            have = want = None
        if isinstance(have, int) and isinstance(want, int) and have > want:
            p.error(f"argument --run: {config} is the model of step {have}, later than the checkpoint's step {want} "
                    f"({ckpt}); --force to overwrite it")
    export(a.run, ckpt)


if __name__ == "__main__":
    main()
