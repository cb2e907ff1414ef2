"""fastdiff's FID against the peer implementation, pytorch-fid (Seitzer 2020), so that "loads
pytorch-fid's Inception weights and gives its numbers" stays true: pytorch-fid's network with
random weights (nothing is downloaded) is saved in the format fastdiff loads, and both give the
same pool3 features, the same features from image files through each one's whole pipeline,
and the same Fréchet distance for the same statistics.

pytorch-fid imports torchvision. On Linux, PyPI's torchvision wheels are CUDA builds; next to a
CPU build of the same torch their compiled ops (nms, roi_align, ...) do not load, and
`import torchvision` fails while registering fake-tensor ("Meta") kernels for those ops.
pytorch-fid's Inception uses none of them (convolutions, pools and BN are torch's), so in that
case torchvision is imported without that one registration module; the Python code of
torchvision's Inception3, which pytorch-fid builds on, runs unchanged.
"""
import sys
import types

import numpy as np
import pytest
import torch

from fastdiff.metrics import FIDInceptionV3, InceptionV3Features, frechet_distance


def _import_pytorch_fid():
    try:
        import pytorch_fid.fid_score
        import pytorch_fid.inception
    except ModuleNotFoundError as e:
        pytest.skip(f"pytorch-fid is not installed ({e}); `pip install '.[fid-peer]'` in an environment "
                    "without diffusers (.ci/run makes one)")
    except RuntimeError as e:
        if "torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "pytorch_fid")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import pytorch_fid.fid_score
        import pytorch_fid.inception
    return pytorch_fid


def _random_fid_weights(seed=0):
    """A state dict for the FID Inception-v3 with random weights drawn here (not by either
    implementation's initialiser): He-scaled convolutions, BN statistics and affine terms away
    from the identity, so every layer shapes the features."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, t in FIDInceptionV3().state_dict().items():
        if name.endswith("num_batches_tracked"):
            state[name] = t.clone()
        elif name.endswith("conv.weight"):
            state[name] = torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5
        elif name.endswith(("bn.weight", "bn.running_var")):
            state[name] = 0.5 + torch.rand(t.shape, generator=g)
        else:  # BN bias / running mean, the unused classifier
            state[name] = 0.1 * torch.randn(t.shape, generator=g)
    return state


@pytest.fixture(autouse=True)
def one_thread():
    """Inception at 299x299 is the cost here; on a shared 2-core machine one thread is several
    times faster than two that wait for each other."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def peers(tmp_path_factory):
    """(pytorch-fid's InceptionV3 for pool3, fastdiff's extractor, the weights file) with the same weights."""
    pytorch_fid = _import_pytorch_fid()
    state = _random_fid_weights()
    path = tmp_path_factory.mktemp("weights") / "pt_inception-random.pth"
    torch.save(state, path)
    mp = pytest.MonkeyPatch()
    urls = []
    mp.setattr(pytorch_fid.inception, "load_state_dict_from_url",
               lambda url, **kw: urls.append(url) or {k: v.clone() for k, v in state.items()})
    try:
        block = pytorch_fid.inception.InceptionV3.BLOCK_INDEX_BY_DIM[2048]
        theirs = pytorch_fid.inception.InceptionV3([block]).eval()  # loads `state` strictly
    finally:
        mp.undo()
    assert urls and urls[0].endswith("pt_inception-2015-12-05-6726825d.pth")  # their FID weights' slot
    return theirs, InceptionV3Features(path), path, pytorch_fid


@torch.no_grad()
def _their_pool3(model, images01):
    return model(images01)[0].squeeze(3).squeeze(2)


def test_pool3_features_equal_pytorch_fid(peers):
    theirs, ours, _, _ = peers
    g = torch.Generator().manual_seed(1)
    x299 = torch.rand(1, 3, 299, 299, generator=g)  # the network's own size: no resize at all
    a, b = _their_pool3(theirs, x299), ours(x299 * 2 - 1)
    assert a.shape == b.shape == (1, 2048)
    assert a.abs().max() > 0.01 and a.std() > 0.01  # features carry signal
    assert torch.equal(b, a)  # the same torch ops in the same order: bit for bit
    # a 32x32 image: pytorch-fid resizes [0, 1] values and then maps them to [-1, 1], fastdiff
    # resizes [-1, 1] values; the maps commute, up to float rounding
    x32 = torch.rand(1, 3, 32, 32, generator=g)
    torch.testing.assert_close(ours(x32 * 2 - 1), _their_pool3(theirs, x32), rtol=1e-4, atol=1e-5)


def test_eval_fid_pipeline_equals_pytorch_fid_on_files(peers, tmp_path, monkeypatch):
    """Image files through each whole pipeline give the same features: pytorch-fid's (PIL RGB ->
    [0, 1] -> bilinear to 299) and `fastdiff eval fid` with its default --reference-resize
    direct, on a 48x48 reference folder and 32x32 samples."""
    import json

    from PIL import Image

    import fastdiff.cli.eval
    from fastdiff.cli import build_parser
    theirs, _, weights, pytorch_fid = peers
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 256, (3, 48, 48, 3), dtype=np.uint8)
    samples = rng.integers(0, 256, (3, 32, 32, 3), dtype=np.uint8)
    files = {}
    for name, images in (("ref", ref), ("samples", samples)):
        (tmp_path / name).mkdir()
        files[name] = [tmp_path / name / f"{i}.png" for i in range(len(images))]
        for img, f in zip(images, files[name]):
            Image.fromarray(img).save(f)
    acts = {k: pytorch_fid.fid_score.get_activations(v, theirs, batch_size=3, dims=2048, device="cpu",
                                                     num_workers=0) for k, v in files.items()}
    computed = []
    real_features_of = fastdiff.cli.eval._features_of
    monkeypatch.setattr(fastdiff.cli.eval, "_features_of",
                        lambda extractor, batches: computed.append(real_features_of(extractor, batches)) or computed[-1])
    np.savez(tmp_path / "samples.npz", images=samples)
    out = tmp_path / "fid.json"
    args = build_parser().parse_args(["eval", "fid", str(tmp_path / "samples.npz"), "--data", str(tmp_path / "ref"),
                                      "--features", "inception", "--inception-weights", str(weights), "--n", "3",
                                      "--no-kid", "--json", str(out), "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    result = json.loads(out.read_text())
    assert result["reference_resize"] == "direct" and result["n_reference"] == 3 and result["fid"] > 0
    assert len(computed) == 2  # the samples, then the reference
    np.testing.assert_allclose(computed[0], acts["samples"], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(computed[1], acts["ref"], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("d, n", [(8, 50), (64, 400)])
def test_frechet_distance_equals_pytorch_fid(peers, d, n):
    """Full-rank statistics (n > d), non-commuting covariances: fastdiff's symmetric route and
    its sqrtm route both equal pytorch-fid's calculate_frechet_distance."""
    _, _, _, pytorch_fid = peers
    rng = np.random.default_rng(d)
    f1 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d))
    f2 = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 0.5
    stats = (f1.mean(0), np.cov(f1, rowvar=False), f2.mean(0), np.cov(f2, rowvar=False))
    theirs = float(pytorch_fid.fid_score.calculate_frechet_distance(*stats))
    assert theirs > 1
    for method in ("eigh", "sqrtm"):
        assert frechet_distance(*stats, method=method) == pytest.approx(theirs, rel=1e-9)
