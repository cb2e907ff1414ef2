"""Every Python example in the README runs as pasted (in a folder holding the runs its text
says to train first, made here with a few steps each)."""
import re
from pathlib import Path

import pytest
import torch

from fastdiff.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_python_examples():
    assert len(BLOCKS) >= 3


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    common = ["--data", "shapes", "--dataset-size", "16", "--batch-size", "4", "--steps", "2", "--sample-steps", "2",
              "--sample-n", "2", "--no-progress"]
    assert main(["train", "--out", str(root / "runs" / "shapes"), "--class-cond", *common]) == 0
    assert main(["train", "--out", str(root / "runs" / "uncond"), *common]) == 0
    assert main(["train-classifier", "--out", str(root / "runs" / "clf"), "--steps", "2", "--preset", "tiny",
                 "--batch-size", "4", "--no-progress"]) == 0
    return root


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, workdir, monkeypatch):
    torch.set_num_threads(2)
    monkeypatch.chdir(workdir)
    exec(compile(BLOCKS[index], f"README.md python block {index}", "exec"), {"__name__": "__readme__"})
