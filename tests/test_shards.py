"""`fastdiff sample` in shards: torchrun ranks (gloo, CPU) give the single process's images bit
for bit, a killed run resumes without redrawing finished shards, and `eval fid` reads a shard
folder. The model is the shipped 16x16 class-conditional one (classifier-free guidance on)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.cli import main
from fastdiff.sampling.shards import ShardPlan, assign, read_shards, shard_path

MODEL = str(Path(__file__).parent / "data" / "shapes16-cfg.safetensors")
# 6 samples, 3 DDIM steps, 2 per forward batch: 3 shards of 2 with --shard-size 2
COMMON = ["--n", "6", "--steps", "3", "--batch-size", "2", "--no-progress"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process output (PNG grid + .npz), as users get it today."""
    out = tmp_path_factory.mktemp("ref") / "s.png"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: a second thread only waits on a shared machine
    try:
        assert main(["sample", MODEL, *COMMON, "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    with np.load(out.with_suffix(".npz")) as z:
        return {"images": z["images"], "labels": z["labels"], "png": np.asarray(Image.open(out))}


def test_plan_and_assignment():
    plan = ShardPlan(7, 3)
    assert plan.num_shards == 3 and [plan.bounds(k) for k in range(3)] == [(0, 3), (3, 6), (6, 7)]
    # a resumed run balances what is left, and the ranks cover it exactly once
    left = [1, 2, 4, 5, 6]
    parts = [assign(left, r, 2) for r in range(2)]
    assert parts == [[1, 4, 6], [2, 5]]
    with pytest.raises(ValueError, match="shard_size"):
        ShardPlan(4, 0)


def test_two_torchrun_ranks_give_the_single_process_images_bitwise(tmp_path, reference):
    out = tmp_path / "merged.png"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # "--" ends torchrun's options: its parser would take `--n` for an ambiguous `--nnodes`/`--nproc...`
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fastdiff",
           "--", "sample", MODEL, *COMMON, "--shard-size", "2", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "3 shards of 2 on 2 rank(s)" in proc.stdout
    with np.load(tmp_path / "merged.npz") as z:
        assert np.array_equal(z["images"], reference["images"])
        assert np.array_equal(z["labels"], reference["labels"])
    assert np.array_equal(np.asarray(Image.open(out)), reference["png"])
    # the shard folder itself: the union of the shards, and one PNG per sample
    images, labels = read_shards(tmp_path / "merged.shards")
    assert np.array_equal(images, reference["images"]) and np.array_equal(labels, reference["labels"])
    pngs = sorted((tmp_path / "merged.shards" / "images").glob("*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(6)]
    assert np.array_equal(np.asarray(Image.open(pngs[4])), reference["images"][4])


def test_killed_run_resumes_without_redrawing_finished_shards(tmp_path, monkeypatch, capsys, reference):
    torch.set_num_threads(1)  # restored by conftest
    folder = tmp_path / "shards"
    cmd = ["sample", MODEL, *COMMON, "--shard-size", "2", "--out", f"{folder}/"]
    # die while committing shard 1 (between its temp file and the rename)
    monkeypatch.setenv("FASTDIFF_TEST_SAVE_HOOK", "raise")
    monkeypatch.setenv("FASTDIFF_TEST_SAVE_HOOK_MATCH", "shard-00001.npz@1")
    with pytest.raises(RuntimeError, match="simulated failure"):
        main(cmd)
    assert shard_path(folder, 0).is_file() and not shard_path(folder, 1).exists()
    assert not list(folder.glob(".*.tmp"))  # nothing half-written is left under any name
    first = shard_path(folder, 0).stat().st_mtime_ns
    with pytest.raises(FileNotFoundError, match="2 of 3 shards are not written"):
        read_shards(folder)
    monkeypatch.delenv("FASTDIFF_TEST_SAVE_HOOK")
    capsys.readouterr()
    assert main(cmd) == 0
    assert "1 of 3 shards already finished, drawing 2" in capsys.readouterr().out
    assert shard_path(folder, 0).stat().st_mtime_ns == first  # not redrawn
    images, labels = read_shards(folder)
    assert np.array_equal(images, reference["images"]) and np.array_equal(labels, reference["labels"])


def test_shards_of_other_settings_are_refused(tmp_path, capsys):
    torch.set_num_threads(1)  # restored by conftest
    folder = f"{tmp_path / 'shards'}/"
    assert main(["sample", MODEL, "--n", "2", "--steps", "1", "--batch-size", "2", "--no-progress",
                 "--out", folder]) == 0
    capsys.readouterr()
    code = main(["sample", MODEL, "--n", "2", "--steps", "1", "--batch-size", "2", "--no-progress", "--seed", "1",
                 "--out", folder])
    err = capsys.readouterr().err
    assert code == 2 and "seed: 0 there, 1 now" in err
    code = main(["sample", MODEL, "--n", "4", "--steps", "1", "--batch-size", "2", "--shard-size", "3",
                 "--out", str(tmp_path / "x.png")])
    assert code == 2 and "--shard-size must be a multiple of --batch-size 2, got 3" in capsys.readouterr().err


def test_eval_fid_reads_a_shard_folder_as_its_images(tmp_path, capsys, reference):
    torch.set_num_threads(1)  # restored by conftest
    folder = tmp_path / "shards"
    assert main(["sample", MODEL, *COMMON, "--shard-size", "2", "--out", f"{folder}/"]) == 0
    npz = tmp_path / "merged.npz"
    np.savez(npz, images=reference["images"], labels=reference["labels"])
    features = tmp_path / "features"
    assert main(["train-features", "--out", str(features), "--steps", "2", "--dataset-size", "32",
                 "--image-size", "16", "--no-progress"]) == 0
    fids = []
    for source in (folder, npz):
        out_json = tmp_path / f"{source.name}.json"
        assert main(["eval", "fid", str(source), "--data", "shapes", "--shapes-features", str(features),
                     "--n", "6", "--no-progress", "--json", str(out_json)]) == 0
        result = json.loads(out_json.read_text())
        assert result["n_generated"] == 6
        fids.append(result["fid"])
    assert fids[0] == fids[1]  # the same images, read from the shards or from the single-process .npz
