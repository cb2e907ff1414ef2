"""diffusers interop (#14): imported U-Nets and schedulers compute what diffusers computes,
exported folders load in diffusers, and the round trip is bitwise. Models are built by
diffusers itself with random weights (save_pretrained into tmp_path); nothing is downloaded."""
import math

import pytest
import torch

import fastdiff
from fastdiff import GaussianDiffusion, NoiseSchedule
from fastdiff.errors import InputError
from fastdiff.interop import export_diffusers
from fastdiff.nn import GroupNormSiLU


# --------------------------------------------------------------------------- final abar
def test_final_alpha_cumprod_sets_the_last_ddim_step():
    """DDIM's last step with abar_final: x = sqrt(abar_final) x0 + sqrt(1 - abar_final) eps
    (Eq. 114 with abar_prev = abar_final), x0 and eps from the model's eps at t = 0."""
    s = NoiseSchedule.from_betas(torch.linspace(0.1, 0.2, 4, dtype=torch.float64))
    x_T = torch.randn(2, 3, 4, 4, dtype=torch.float64) * 0.1
    eps = 0.3 * torch.ones_like(x_T)
    model = lambda x, t: eps  # noqa: E731
    for final in (1.0, s.alphas_cumprod[0].item(), 0.5):  # 1, diffusers' set_alpha_to_one=False, any
        d = GaussianDiffusion(s, final_alpha_cumprod=final)
        assert d.respace([0, 2]).final_alpha_cumprod == final
        out = fastdiff.sample(model, x_T=x_T, steps=1, diffusion=GaussianDiffusion(
            NoiseSchedule.from_betas(s.betas[:1]), final_alpha_cumprod=final), clip_denoised=False,
            dtype=torch.float64)
        ac = s.alphas_cumprod[0].item()
        x0 = (x_T - math.sqrt(1 - ac) * eps) / math.sqrt(ac)
        torch.testing.assert_close(out, math.sqrt(final) * x0 + math.sqrt(1 - final) * eps)
    with pytest.raises(ValueError, match="final_alpha_cumprod"):
        GaussianDiffusion(s, final_alpha_cumprod=0.0)


def test_default_clip_denoised_attribute_is_used_when_clip_is_not_given():
    s = NoiseSchedule.from_betas([0.5])
    x_T = torch.full((1, 1, 2, 2), 3.0)

    class Model(torch.nn.Module):
        default_clip_denoised = False

        def forward(self, x, t):
            return torch.zeros_like(x)

    d = GaussianDiffusion(s)
    unclipped = fastdiff.sample(Model(), x_T=x_T, steps=1, diffusion=d)
    torch.testing.assert_close(unclipped, x_T / math.sqrt(0.5))  # x0 = x_T / sqrt(abar), not clamped
    torch.testing.assert_close(fastdiff.sample(Model(), x_T=x_T, steps=1, diffusion=d, clip_denoised=True),
                               torch.ones_like(x_T))


# --------------------------------------------------------------------------- U-Net import


def _diffusers():
    return pytest.importorskip("diffusers")


# Tiny versions of the families' layouts: the real ones differ only in widths and sizes.
UNET_CONFIGS = {
    # google/ddpm-cifar10-32 (Ho et al.'s CIFAR-10 network), widths / 8 and 16x16 images
    "ddpm-cifar10-32": dict(sample_size=16, block_out_channels=(16, 32, 32, 32), layers_per_block=2,
                            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                            attention_head_dim=None, norm_num_groups=8, norm_eps=1e-6, downsample_padding=0,
                            flip_sin_to_cos=False, freq_shift=1, dropout=0.1),
    # google/ddpm-celebahq-256: six levels, attention at the fifth, reduced widths and 32x32
    "ddpm-celebahq-256": dict(sample_size=32, block_out_channels=(8, 8, 16, 16, 32, 32), layers_per_block=1,
                              down_block_types=("DownBlock2D",) * 4 + ("AttnDownBlock2D", "DownBlock2D"),
                              up_block_types=("UpBlock2D", "AttnUpBlock2D") + ("UpBlock2D",) * 4,
                              attention_head_dim=None, norm_num_groups=4, norm_eps=1e-6, downsample_padding=0,
                              flip_sin_to_cos=False, freq_shift=1),
    # diffusers' defaults (flip_sin_to_cos, head dim 8) with class embeddings
    "class-conditional": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, num_class_embeds=10,
                              down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                              up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8),
    "attention-head-dim": dict(sample_size=16, block_out_channels=(16, 32, 48), layers_per_block=1,
                               attention_head_dim=8, norm_num_groups=8, center_input_sample=True,
                               down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                               up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D")),
    "learned-variance": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, out_channels=6,
                             down_block_types=("AttnDownBlock2D", "DownBlock2D"),
                             up_block_types=("UpBlock2D", "AttnUpBlock2D"), norm_num_groups=8, add_attention=False),
    "scale-shift": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                        resnet_time_scale_shift="scale_shift", attention_head_dim=16,
                        down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                        up_block_types=("AttnUpBlock2D", "UpBlock2D")),
    "scale-shift-attn-groups": dict(sample_size=8, block_out_channels=(16, 32), layers_per_block=1,
                                    norm_num_groups=8, attn_norm_num_groups=8, resnet_time_scale_shift="scale_shift",
                                    down_block_types=("DownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "UpBlock2D")),
}


def _random_unet(config: dict, seed: int = 0):
    """A diffusers UNet2DModel with every parameter random (no zero-initialised layer hides a
    wrong mapping)."""
    torch.manual_seed(seed)
    model = _diffusers().UNet2DModel(**config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


@pytest.mark.parametrize("name", list(UNET_CONFIGS))
def test_imported_unet_computes_what_diffusers_computes(name, tmp_path):
    config = UNET_CONFIGS[name]
    theirs = _random_unet(config)
    theirs.save_pretrained(tmp_path, safe_serialization=name != "learned-variance")  # one .bin folder
    ours, info = fastdiff.load_model(tmp_path)
    assert isinstance(ours, fastdiff.UNet) and info["format"] == "diffusers"
    size, batch = config["sample_size"], 4
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([0, 1, 500, 999])
    labels = torch.tensor([0, 3, 9, 5]) if config.get("num_class_embeds") else None
    with torch.no_grad():
        expected = theirs(x, t, class_labels=labels).sample
        got = ours(x, t, y=labels)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4, (got - expected).abs().max().item()
    assert expected.abs().max().item() > 0.1  # a real signal, not two zero outputs
    # eps moves the outputs less than the tolerance on random weights: check it where it is used
    norms = [m for m in ours.modules() if isinstance(m, GroupNormSiLU)]
    assert norms and all(m.eps == config.get("norm_eps", 1e-5) for m in norms)


# --------------------------------------------------------------------------- bad input
SMALL = dict(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
             down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"))


@pytest.fixture(scope="module")
def small_pipeline(tmp_path_factory):
    """A DDIM pipeline folder around a small random U-Net."""
    d = _diffusers()
    folder = tmp_path_factory.mktemp("pipeline")
    d.DDIMPipeline(unet=_random_unet(SMALL), scheduler=d.DDIMScheduler()).save_pretrained(folder)
    return folder


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _edit_json(path, **changes):
    import json
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value, message", [
    ("down_block_types", ["DownBlock2D", "SkipDownBlock2D"], "down_block_types='SkipDownBlock2D'"),
    ("_class_name", "UNet2DConditionModel", "UNet2DConditionModel"),
    ("up_block_types", ["UpBlock2D", "UpBlock2D"], "up_block_types"),  # attention not mirrored
    ("time_embedding_type", "fourier", "time_embedding_type='fourier'"),
    ("resnet_time_scale_shift", "ada_group", "resnet_time_scale_shift='ada_group'"),
    ("class_embed_type", "timestep", "class_embed_type='timestep'"),
    ("mid_block_scale_factor", 2.0, "mid_block_scale_factor=2.0"),
    ("attention_head_dim", 5, "attention_head_dim=5"),
    ("cross_attention_dim", 768, "cross_attention_dim"),
    ("out_channels", 4, "out_channels=4"),
])
def test_unsupported_unet_config_is_refused_by_name(small_pipeline, tmp_path, field, value, message):
    folder = _copy(small_pipeline, tmp_path / "p")
    _edit_json(folder / "unet" / "config.json", **{field: value})
    with pytest.raises(InputError, match=message.replace("[", r"\[").replace("(", r"\(")):
        fastdiff.load_model(folder)


@pytest.mark.parametrize("field, value, message", [
    ("thresholding", True, "thresholding=True"),
    ("beta_schedule", "sigmoid", "beta_schedule='sigmoid'"),
    ("prediction_type", "flow", "prediction_type='flow'"),
    ("clip_sample_range", 2.0, "clip_sample_range=2.0"),
    ("timestep_spacing", "karras", "timestep_spacing='karras'"),
    ("rescale_betas_zero_snr", True, "rescale_betas_zero_snr=True"),
])
def test_unsupported_scheduler_config_is_refused_by_name(small_pipeline, tmp_path, field, value, message):
    folder = _copy(small_pipeline, tmp_path / "p")
    _edit_json(folder / "scheduler" / "scheduler_config.json", **{field: value})
    with pytest.raises(InputError, match=message):
        fastdiff.load_model(folder)


@pytest.mark.parametrize("variance_type", ["learned", "fixed_large_log"])
def test_ddpm_variance_types_diffusers_reads_differently_are_refused(small_pipeline, tmp_path, variance_type):
    folder = _copy(small_pipeline, tmp_path / "p")
    _edit_json(folder / "scheduler" / "scheduler_config.json", _class_name="DDPMScheduler", variance_type=variance_type)
    with pytest.raises(InputError, match=f"variance_type='{variance_type}'"):
        fastdiff.load_model(folder)


def test_broken_weights_are_one_clear_error_each(small_pipeline, tmp_path):
    from safetensors.torch import load_file, save_file

    weights = "unet/diffusion_pytorch_model.safetensors"
    missing = _copy(small_pipeline, tmp_path / "missing")
    (missing / weights).unlink()
    with pytest.raises(InputError, match="no weights"):
        fastdiff.load_model(missing)
    truncated = _copy(small_pipeline, tmp_path / "truncated")
    data = (truncated / weights).read_bytes()
    (truncated / weights).write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match="not a readable safetensors file"):
        fastdiff.load_model(truncated)
    extra = _copy(small_pipeline, tmp_path / "extra")
    tensors = load_file(extra / weights)
    tensors["down_blocks.0.resnets.0.surprise.weight"] = torch.zeros(2)
    save_file(tensors, extra / weights)
    with pytest.raises(InputError, match="unknown weight.*surprise"):
        fastdiff.load_model(extra)
    lacking = _copy(small_pipeline, tmp_path / "lacking")
    tensors = load_file(lacking / weights)
    del tensors["conv_in.bias"]
    save_file(tensors, lacking / weights)
    with pytest.raises(InputError, match="missing weight.*conv_in.bias"):
        fastdiff.load_model(lacking)
    wrong_shape = _copy(small_pipeline, tmp_path / "shape")
    tensors = load_file(wrong_shape / weights)
    tensors["conv_in.bias"] = torch.zeros(3)
    save_file(tensors, wrong_shape / weights)
    with pytest.raises(InputError, match="do not fit the config"):
        fastdiff.load_model(wrong_shape)


def test_latent_pipeline_is_refused(small_pipeline, tmp_path):
    folder = _copy(small_pipeline, tmp_path / "p")
    _edit_json(folder / "model_index.json", vqvae=["diffusers", "VQModel"])
    with pytest.raises(InputError, match="vqvae"):
        fastdiff.load_model(folder)


# --------------------------------------------------------------------------- export
def _as_images(x: torch.Tensor):
    """fastdiff's samples as diffusers pipelines return them with output_type='np'."""
    return (x / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def _random_fastdiff(seed=0, **kwargs):
    """A small fastdiff UNet with every parameter random (conv_out and the attention outputs
    start at zero otherwise)."""
    torch.manual_seed(seed)
    model = fastdiff.UNet(**{**dict(image_size=8, model_channels=16, channel_mult=(1, 2), num_res_blocks=1,
                                    attention_resolutions=(4,), dropout=0.0, num_groups=8), **kwargs}).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model


EXPORTABLE = {
    "linear-eps": dict(),
    "cosine-v-scale-shift": dict(use_scale_shift_norm=True, num_head_channels=8, diffusion=GaussianDiffusion(
        NoiseSchedule.cosine(1000), prediction="v")),
    "learned-range": dict(learn_sigma=True),
    "class-conditional": dict(num_classes=3, num_heads=2),
    "x0-fixed-large-T100": dict(diffusion=GaussianDiffusion(NoiseSchedule.linear(100), prediction="x0",
                                                           variance="fixed_large")),
    "custom-betas": dict(diffusion=GaussianDiffusion(NoiseSchedule.from_betas(
        torch.linspace(1e-3, 0.05, 200, dtype=torch.float64) ** 1.5))),
}


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_export_round_trip_is_bitwise(name, tmp_path):
    """fastdiff -> diffusers folder -> fastdiff: every tensor, the schedule and the config equal."""
    model = _random_fastdiff(**EXPORTABLE[name])
    model.default_guidance_scale = 2.5
    export_diffusers(model, tmp_path / "out")
    back, info = fastdiff.load_model(tmp_path / "out")
    before, after = model.state_dict(), back.state_dict()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    d, e = model.diffusion, back.diffusion
    assert torch.equal(d.betas, e.betas) and (d.prediction, d.variance, d.loss) == (e.prediction, e.variance, e.loss)
    assert back.num_classes == model.num_classes and back.null_label == model.null_label
    assert back.default_guidance_scale == 2.5
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([3, d.T - 1])
    with torch.no_grad():
        assert torch.equal(model(x, t), back(x, t))


@pytest.mark.parametrize("name", list(EXPORTABLE))
def test_exported_folder_loads_in_diffusers_and_computes_the_same(name, tmp_path):
    d = _diffusers()
    model = _random_fastdiff(**EXPORTABLE[name])
    export_diffusers(model, tmp_path / "out")
    pipe = d.DiffusionPipeline.from_pretrained(tmp_path / "out")
    expected_pipeline = "DDIMPipeline" if model.diffusion.variance == "fixed_small" else "DDPMPipeline"
    assert type(pipe).__name__ == expected_pipeline
    x = torch.randn(2, 3, 8, 8)
    t = torch.tensor([0, model.diffusion.T - 1])
    labels = torch.tensor([0, 3]) if model.num_classes else None  # 3 = fastdiff's "no label" row
    with torch.no_grad():
        theirs = pipe.unet(x, t, class_labels=labels).sample
        ours = model(x, t, y=labels)
    assert (theirs - ours).abs().max().item() <= 1e-4
    torch.testing.assert_close(pipe.scheduler.alphas_cumprod.double(), model.diffusion.alphas_cumprod,
                               rtol=1e-5, atol=1e-6)


def _draw_fastdiffs_noise(monkeypatch, seed: int, steps: int) -> list:
    """Make DDPMPipeline's per-step noise fastdiff's stream: its k-th draw belongs to fastdiff's
    respaced step index steps - 1 - k. Returns the list of the draws' shapes, filled as it runs."""
    import diffusers.schedulers.scheduling_ddpm as ddpm_module

    calls = []

    def fastdiff_noise(shape, generator=None, device=None, dtype=None, **kwargs):
        calls.append(shape)
        return fastdiff.ops.randn(tuple(shape), seed=seed, step=steps - len(calls), dtype=dtype or torch.float32)

    monkeypatch.setattr(ddpm_module, "randn_tensor", fastdiff_noise)
    return calls


def test_exported_pipeline_draws_fastdiffs_images(tmp_path, monkeypatch):
    """export -> DDIMPipeline gives fastdiff's DDIM images; a learned-range model's DDPMPipeline
    gives fastdiff's ancestral images given the same per-step noise."""
    d = _diffusers()
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model = _random_fastdiff(seed=1, diffusion=GaussianDiffusion(NoiseSchedule.cosine(1000), prediction="v"))
    export_diffusers(model, tmp_path / "ddim")
    pipe = d.DiffusionPipeline.from_pretrained(tmp_path / "ddim")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=20,
                  use_clipped_model_output=True, output_type="np").images
    ours = _as_images(fastdiff.sample(model, x_T=x_T, steps=20, spacing="leading"))
    assert abs(theirs - ours).max() <= 1e-3

    steps, seed = 10, 7
    model = _random_fastdiff(seed=2, learn_sigma=True)
    export_diffusers(model, tmp_path / "ddpm")
    pipe = d.DiffusionPipeline.from_pretrained(tmp_path / "ddpm")
    pipe.set_progress_bar_config(disable=True)
    _draw_fastdiffs_noise(monkeypatch, seed, steps)
    theirs = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                  output_type="np").images
    ours = _as_images(fastdiff.sample(model, x_T=x_T, steps=steps, sampler="ddpm", seed=seed, spacing="leading"))
    assert abs(theirs - ours).max() <= 1e-3


def test_what_diffusers_cannot_express_is_refused_and_nothing_written(tmp_path):
    from fastdiff.errors import UserError

    cases = {
        "learned": dict(diffusion=GaussianDiffusion(NoiseSchedule.linear(1000), variance="learned", loss="hybrid")),
        "heads over widths": dict(num_heads=2, attention_resolutions=(8, 4)),
    }
    for name, kwargs in cases.items():
        model = _random_fastdiff(**kwargs)
        out = tmp_path / name.replace(" ", "-")
        with pytest.raises(UserError):
            export_diffusers(model, out)
        assert not out.exists() and list(tmp_path.iterdir()) == [], name
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not an empty folder"):
        export_diffusers(_random_fastdiff(), occupied)
    assert [p.name for p in occupied.iterdir()] == ["keep.txt"]


def test_diffusers_folder_round_trip_is_bitwise(tmp_path):
    """diffusers -> fastdiff -> diffusers: the same tensors under the same names."""
    from safetensors.torch import load_file

    config = UNET_CONFIGS["scale-shift"]
    _random_unet(config).save_pretrained(tmp_path / "in")
    model, _ = fastdiff.load_model(tmp_path / "in")
    export_diffusers(model, tmp_path / "out")
    before = load_file(tmp_path / "in" / "diffusion_pytorch_model.safetensors")
    after = load_file(tmp_path / "out" / "unet" / "diffusion_pytorch_model.safetensors")
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k


def test_cli_export_diffusers_and_sample_the_folder(tmp_path):
    from fastdiff.cli import main
    from fastdiff.train import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(out=str(run), data="shapes", dataset_size=8, batch_size=4, preset="tiny", progress=False,
                      sample_at_end=False, T=20, warmup_steps=1, image_size=16, steps=1, sample_steps=2,
                      schedule="cosine", prediction="v"))
    assert main(["export", str(run), "--format", "diffusers", "--out", str(tmp_path / "pipe")]) == 0
    assert (tmp_path / "pipe" / "model_index.json").is_file()
    assert main(["sample", str(tmp_path / "pipe"), "--n", "2", "--steps", "2", "--no-progress",
                 "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.npz").is_file()
# --------------------------------------------------------------------------- same samples
@pytest.mark.parametrize("scheduler, call", [
    # diffusers' defaults except clip_sample=False (see the module note on clipping), leading spacing
    # with steps_offset=1 and set_alpha_to_one=False: DDIMPipeline as users call it
    (dict(clip_sample=False, timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False), {}),
    # trailing spacing, cosine schedule, v prediction, clipping (eps recomputed from the clipped x0)
    (dict(timestep_spacing="trailing", beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction"),
     dict(use_clipped_model_output=True)),
])
def test_ddim_50_equals_ddim_pipeline(tmp_path, scheduler, call):
    d = _diffusers()
    pipe = d.DDIMPipeline(unet=_random_unet(SMALL, seed=2), scheduler=d.DDIMScheduler(**scheduler))
    pipe.save_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), eta=0.0, num_inference_steps=50,
                    output_type="np", **call).images
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))  # the pipeline's first draw
    model, _ = fastdiff.load_model(tmp_path)
    got = _as_images(fastdiff.sample(model, x_T=x_T, steps=50))
    assert abs(got - expected).max() <= 1e-3, abs(got - expected).max()
    assert expected.std() > 0.05


def test_ancestral_ddpm_equals_ddpm_pipeline_given_the_same_noise(tmp_path, monkeypatch):
    """DDPMPipeline (fixed_small, clipping, 20 leading steps) with its per-step noise replaced by
    fastdiff's stream for the same step: the images must agree."""
    d = _diffusers()
    steps, seed = 20, 3
    pipe = d.DDPMPipeline(unet=_random_unet(SMALL, seed=4), scheduler=d.DDPMScheduler(variance_type="fixed_small"))
    pipe.save_pretrained(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    calls = _draw_fastdiffs_noise(monkeypatch, seed, steps)
    expected = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), num_inference_steps=steps,
                    output_type="np").images
    assert len(calls) == steps - 1  # no noise leaving t = 0
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model, _ = fastdiff.load_model(tmp_path)
    got = _as_images(fastdiff.sample(model, x_T=x_T, steps=steps, sampler="ddpm", seed=seed))
    assert abs(got - expected).max() <= 1e-3, abs(got - expected).max()


def test_a_diffusers_unet_object_samples_directly(tmp_path):
    """fastdiff.sample on diffusers' own UNet2DModel (its UNet2DOutput unwrapped) equals fastdiff
    on the imported copy."""
    theirs = _random_unet(SMALL, seed=5)
    theirs.save_pretrained(tmp_path)
    ours, _ = fastdiff.load_model(tmp_path)
    x_T = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = fastdiff.sample(theirs, x_T=x_T, steps=5, diffusion=ours.diffusion, spacing="trailing")
    b = fastdiff.sample(ours, x_T=x_T, steps=5, spacing="trailing")
    assert (a - b).abs().max().item() <= 1e-4


