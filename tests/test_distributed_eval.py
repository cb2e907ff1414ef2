"""`fastdiff eval fid` under torchrun: 2 CPU ranks (gloo) each draw and featurise their block of
whole batches, the features are gathered once, and rank 0 reports what one process reports,
bitwise (same batches at the same thread count give the same features; the FID, KID and
precision/recall of the same rows in the same order are the same computation)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastdiff.cli import main
from fastdiff.train.distributed import batch_aligned_share, gather_rows

MODEL = str(Path(__file__).parent / "data" / "shapes16-cfg.safetensors")


@pytest.mark.parametrize("count, batch_size, world", [(6, 2, 2), (7, 2, 3), (1, 4, 2), (10, 3, 4), (9, 9, 1)])
def test_shares_are_whole_batches_covering_everything_once(count, batch_size, world):
    shares = [batch_aligned_share(count, batch_size, r, world) for r in range(world)]
    assert shares[0][0] == 0 and shares[-1][1] == count
    for (a, b), (c, _) in zip(shares, shares[1:]):
        assert b == c  # contiguous, in rank order
    for a, b in shares:
        assert a % batch_size == 0 and (b % batch_size == 0 or b == count)  # batch boundaries
    with pytest.raises(ValueError, match="rank must be in"):
        batch_aligned_share(4, 2, 2, 2)


def test_gather_rows_on_one_process_is_the_rows():
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(gather_rows(rows, 1, torch.device("cpu")), rows)
    with pytest.raises(ValueError, match="rows must be 2-D"):
        gather_rows(torch.zeros(3), 1, torch.device("cpu"))


def test_two_torchrun_ranks_give_the_single_process_fid_bitwise(tmp_path, capsys):
    torch.set_num_threads(1)  # restored by conftest; the ranks run with OMP_NUM_THREADS=1 too
    features = tmp_path / "features"
    assert main(["train-features", "--out", str(features), "--steps", "2", "--dataset-size", "32",
                 "--image-size", "16", "--no-progress"]) == 0
    # 6 samples in 3 batches of 2: rank 0 draws 1 batch, rank 1 two (uneven shares, padded gather)
    args = ["eval", "fid", MODEL, "--data", "shapes", "--shapes-features", str(features), "--n", "6",
            "--steps", "3", "--batch-size", "2", "--kid-subsets", "5", "--precision-recall", "--no-progress"]
    assert main([*args, "--json", str(tmp_path / "one.json")]) == 0
    capsys.readouterr()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
           "--", *args, "--json", str(tmp_path / "two.json")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FID:") == 1 and "features on 2 ranks" in proc.stdout  # rank 0 reports, once
    one, two = (json.loads((tmp_path / f"{k}.json").read_text()) for k in ("one", "two"))
    assert one["ranks"] == 1 and two["ranks"] == 2
    assert one["n_generated"] == two["n_generated"] == 6 and one["n_reference"] == two["n_reference"] == 6
    for key in ("fid", "kid", "kid_std", "precision", "recall"):
        assert one[key] == two[key], (key, one[key], two[key])
