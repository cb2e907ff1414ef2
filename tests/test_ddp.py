"""DDP training on two CPU ranks (gloo, torchrun) against one process: per-rank batch B on 2
ranks matches batch 2B on one process (same examples, t, noise and label dropout; gradients
averaged by DDP), up to the rounding of a different reduction order."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
from safetensors.torch import load_file

from fastdiff.train import TrainConfig, train
from fastdiff.train.checkpoint import read_checkpoint_record

STEPS = 3
# dropout 0: dropout masks are drawn per rank (they are the one thing that cannot match)
ARGS = dict(data="shapes", dataset_size=16, preset="tiny", T=50, steps=STEPS, class_cond=True, p_uncond=0.5,
            dropout=0.0, warmup_steps=0, lr=1e-3, sample_steps=2, sample_n=2, sample_at_end=False)


def _cli_args(config: dict) -> list:
    flags = {"dataset_size": "--dataset-size", "warmup_steps": "--warmup", "sample_steps": "--sample-steps",
             "sample_n": "--sample-n", "p_uncond": "--p-uncond", "batch_size": "--batch-size"}
    out = []
    for k, v in config.items():
        if k in ("class_cond", "sample_at_end"):
            continue
        out += [flags.get(k, f"--{k.replace('_', '-')}"), str(v)]
    return out + ["--class-cond", "--no-progress"]


def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(tmp_path):
    torch.set_num_threads(1)  # restored by conftest
    single = train(TrainConfig(out=str(tmp_path / "single"), batch_size=4, progress=False, **ARGS))
    record = read_checkpoint_record(tmp_path / "single")
    w_single = load_file(str(tmp_path / "single" / record["weights"]))

    dump = tmp_path / "ranks"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "FASTDIFF_TEST_DUMP_WEIGHTS": str(dump)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
           "--", "train", "--out", str(tmp_path / "ddp"), *_cli_args(dict(ARGS, batch_size=2))]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w_ddp = load_file(str(dump / "rank0.safetensors"))

    # The same loss at every step: the 2 x 2 examples, t and noise are the 4 of the single run.
    # (Before t and noise were drawn per global batch, step 0's loss differed by tens of percent.)
    log = [json.loads(line) for line in (tmp_path / "ddp" / "log.jsonl").read_text().splitlines()]
    ddp_losses = [r["loss"] for r in log]
    single_losses = [l for _, l in single.losses]
    assert len(ddp_losses) == len(single_losses) == STEPS
    np.testing.assert_allclose(ddp_losses, single_losses, rtol=1e-5)

    # The same weights: an AdamW step moves an entry by about lr, so other examples/t/noise
    # would differ by ~lr per step; rounding of the reduction order moved entries by <5e-7 here.
    keys = [k for k in w_single if k.startswith("model.")]
    assert keys and set(keys) <= set(w_ddp)
    for k in keys:
        a, b = w_single[k].double(), w_ddp[k].double()
        assert torch.allclose(a, b, rtol=0, atol=1e-2 * STEPS * ARGS["lr"]), \
            f"{k}: max |single - ddp| = {(a - b).abs().max():.3g}"
