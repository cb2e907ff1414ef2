"""Datasets: the embedded shapes set and each file format, with tiny fixtures."""
import numpy as np
import pytest
import torch
from PIL import Image

from fastdiff.data import (CIFAR_RECORD, SHAPE_CLASSES, DatasetError, StepSampler, load_dataset, make_shapes,
                           to_uint8)


def test_shapes_deterministic_labelled_and_in_range():
    a = load_dataset("shapes", n=40, seed=3)
    b = load_dataset("shapes", n=40, seed=3)
    c = load_dataset("shapes", n=40, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images)
    assert a.images.shape == (40, 3, 32, 32) and a.num_classes == len(SHAPE_CLASSES) == 10
    x, y = a.batch([0, 1, 2])
    assert x.dtype == torch.float32 and x.min() >= -1 and x.max() <= 1 and x.min() < -0.5 and x.max() > 0.3
    # image i depends on (seed, i) only, not on how many are generated
    torch.testing.assert_close(torch.from_numpy(make_shapes(5, seed=3)[0]), a.images[:5])


def test_shapes_classes_look_different():
    # every class appears, and the class-mean foreground masks differ (a sanity check that
    # the label carries information a model can learn)
    images, labels = make_shapes(400, seed=0)
    assert set(labels.tolist()) == set(range(10))
    lum = images.astype(np.float64).mean(axis=1)
    contrast = np.abs(lum - np.median(lum, axis=(1, 2), keepdims=True)) > 30
    means = np.stack([contrast[labels == k].mean(axis=0) for k in range(10)])
    dists = np.abs(means[:, None] - means[None]).mean(axis=(2, 3))
    assert dists[~np.eye(10, dtype=bool)].min() > 0.02


def test_uint8_round_trip():
    ds = load_dataset("shapes", n=4)
    x, _ = ds.batch(range(4))
    assert torch.equal(to_uint8(x), ds.images)


def test_image_folder_resized_cropped_and_labelled(tmp_path):
    for cls in ("cats", "dogs"):
        (tmp_path / cls).mkdir()
        for i in range(2):
            arr = np.full((40, 60, 3), 50 * i + (100 if cls == "dogs" else 0), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / cls / f"{i}.png")
    ds = load_dataset(str(tmp_path), image_size=16)
    assert ds.images.shape == (4, 3, 16, 16)
    assert ds.class_names == ["cats", "dogs"] and ds.labels.tolist() == [0, 0, 1, 1]
    assert ds.images[3].float().mean().item() == pytest.approx(150, abs=1)


def test_image_folder_corrupt_file_is_named(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match="bad.png"):
        load_dataset(str(tmp_path))


def _cifar_bytes(labels, seed=0):
    rng = np.random.default_rng(seed)
    recs = np.empty((len(labels), CIFAR_RECORD), np.uint8)
    recs[:, 0] = labels
    recs[:, 1:] = rng.integers(0, 256, size=(len(labels), 3072))
    return recs


def test_cifar10_binary_files(tmp_path):
    a, b = _cifar_bytes([1, 2, 3]), _cifar_bytes([4, 5], seed=1)
    a.tofile(tmp_path / "data_batch_1.bin")
    b.tofile(tmp_path / "data_batch_2.bin")
    _cifar_bytes([9]).tofile(tmp_path / "test_batch.bin")
    ds = load_dataset(str(tmp_path))
    assert ds.labels.tolist() == [1, 2, 3, 4, 5] and ds.num_classes == 10
    # record layout: 1024 R, then G, then B, row-major
    assert torch.equal(ds.images[3], torch.from_numpy(b[0, 1:].reshape(3, 32, 32)))
    assert load_dataset(str(tmp_path), train=False).labels.tolist() == [9]


def test_cifar10_truncated_file_is_named(tmp_path):
    (tmp_path / "data_batch_1.bin").write_bytes(_cifar_bytes([1]).tobytes()[:-5])
    with pytest.raises(DatasetError, match="data_batch_1.bin"):
        load_dataset(str(tmp_path))


@pytest.mark.parametrize("layout", ["nhwc", "nchw"])
def test_npz_layouts_and_labels(tmp_path, layout):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(5, 32, 32, 3), dtype=np.uint8)
    arr = x if layout == "nhwc" else x.transpose(0, 3, 1, 2)
    np.savez(tmp_path / "d.npz", images=arr, labels=np.arange(5))
    ds = load_dataset(str(tmp_path / "d.npz"))
    assert torch.equal(ds.images, torch.from_numpy(x.transpose(0, 3, 1, 2)))
    assert ds.labels.tolist() == [0, 1, 2, 3, 4]


def test_npz_without_labels_and_grayscale(tmp_path):
    np.savez(tmp_path / "g.npz", x=np.zeros((3, 16, 16), np.uint8))
    ds = load_dataset(str(tmp_path / "g.npz"), image_size=16)
    assert ds.images.shape == (3, 1, 16, 16) and ds.labels is None and ds.num_classes is None


def test_npz_errors_name_the_file(tmp_path):
    np.savez(tmp_path / "nokey.npz", foo=np.zeros(3))
    with pytest.raises(DatasetError, match="nokey.npz.*'x' or 'images'"):
        load_dataset(str(tmp_path / "nokey.npz"))
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DatasetError, match="corrupt.npz"):
        load_dataset(str(tmp_path / "corrupt.npz"))
    # pickled object arrays are refused (allow_pickle=False)
    np.savez(tmp_path / "obj.npz", x=np.array([object()], dtype=object))
    with pytest.raises(DatasetError, match="obj.npz"):
        load_dataset(str(tmp_path / "obj.npz"))


def test_missing_path_is_named(tmp_path):
    with pytest.raises(DatasetError, match="nothere"):
        load_dataset(str(tmp_path / "nothere"))


def test_digits_when_sklearn_is_installed():
    pytest.importorskip("sklearn")
    ds = load_dataset("digits", image_size=16)
    assert ds.images.shape[1:] == (1, 16, 16) and ds.num_classes == 10


def test_step_sampler_depends_only_on_seed_and_step():
    a, b = StepSampler(10, 4, seed=1), StepSampler(10, 4, seed=1)
    for s in (7, 0, 3):  # any order of queries
        assert a.indices(s).tolist() == StepSampler(10, 4, seed=1).indices(s).tolist()
    # each epoch is a permutation: the first 10 examples of steps 0..2 cover all of 0..9
    seen = np.concatenate([b.indices(s) for s in range(3)])[:10]
    assert sorted(seen.tolist()) == list(range(10))
    # two ranks read disjoint slices of the same global batch
    r0, r1 = StepSampler(10, 2, seed=1, rank=0, world=2), StepSampler(10, 2, seed=1, rank=1, world=2)
    assert set(r0.indices(0)).isdisjoint(r1.indices(0))
    assert np.concatenate([r0.indices(0), r1.indices(0)]).tolist() == StepSampler(10, 4, seed=1).indices(0).tolist()


@pytest.mark.parametrize("kwargs, needle", [(dict(n=4, size=9), "size must be an integer >= 10 .*got 9"),
                                            (dict(n=4, size=16.0), "size must be an integer"),
                                            (dict(n=-1, size=16), "n must be an integer >= 0, got -1")])
def test_shapes_bad_arguments_are_named(kwargs, needle):
    with pytest.raises(ValueError, match=needle.replace("(", r"\(")):
        make_shapes(**kwargs)
    assert make_shapes(2, size=10)[0].shape == (2, 3, 10, 10)  # the smallest size that fits
