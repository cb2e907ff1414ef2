"""fastdiff.models.AutoencoderKL against diffusers' AutoencoderKL (the peer implementation) with
the same random weights, and its input errors."""
import diffusers  # the peer; in the `test` extra, so a missing install fails here instead of skipping
import pytest
import torch

from fastdiff.models import AutoencoderKL

CONFIGS = [
    # 2 levels (f = 2), 32 channels, 4 latent channels, 16x16 images: the smallest real case
    dict(block_out_channels=(32, 32), layers_per_block=1, latent_channels=4, norm_num_groups=8, size=16),
    # 3 levels (f = 4), widening 32 -> 64 (conv_shortcut in the residual blocks), 2 layers, 3 latents
    dict(block_out_channels=(32, 64, 64), layers_per_block=2, latent_channels=3, norm_num_groups=16, size=32),
    # one 288-channel level: the mid attention's head is wider than the fused kernel's 256 (SDPA path,
    # as SD's 512-channel VAE takes); f = 1
    dict(block_out_channels=(288,), layers_per_block=1, latent_channels=4, norm_num_groups=32, size=8),
]


def _pair(cfg):
    """A diffusers AutoencoderKL with random weights (norms and biases too) and ours with its state dict."""
    cfg = dict(cfg)
    cfg.pop("size")
    torch.manual_seed(0)
    peer = diffusers.AutoencoderKL(in_channels=3, out_channels=3, **cfg,
                                   down_block_types=("DownEncoderBlock2D",) * len(cfg["block_out_channels"]),
                                   up_block_types=("UpDecoderBlock2D",) * len(cfg["block_out_channels"])).eval()
    with torch.no_grad():
        for p in peer.parameters():  # off the default init (norms at 1/0) so every parameter matters
            p.add_(0.1 * torch.randn_like(p))
    ours = AutoencoderKL(**cfg).eval()
    ours.load_state_dict(peer.state_dict(), strict=True)
    return peer, ours


def _close(a, b, tol=1e-4):
    assert a.shape == b.shape, (a.shape, b.shape)
    err = (a - b).abs().max().item()
    assert err <= tol, f"max |fastdiff - diffusers| = {err:.3g} > {tol}"


@pytest.mark.parametrize("cfg", CONFIGS, ids=["f2", "f4", "wide-head"])
def test_matches_diffusers(cfg):
    peer, ours = _pair(cfg)
    x = torch.randn(2, 3, cfg["size"], cfg["size"], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        post_p = peer.encode(x).latent_dist
        post_o = ours.encode(x)
        f = 2 ** (len(cfg["block_out_channels"]) - 1)
        assert post_o.mean.shape == (2, cfg["latent_channels"], cfg["size"] // f, cfg["size"] // f)
        _close(post_o.mean, post_p.mean)
        _close(post_o.std, post_p.std)
        # same generator state -> same eps -> same reparameterised sample
        _close(post_o.sample(torch.Generator().manual_seed(3)), post_p.sample(torch.Generator().manual_seed(3)))
        _close(post_o.kl(), post_p.kl(), tol=1e-4 * max(1.0, post_p.kl().abs().max().item()))
        z = torch.randn_like(post_p.mean)
        _close(ours.decode(z), peer.decode(z).sample)
        _close(ours(x), peer(x).sample)
    assert ours.downsampling_factor == f


def test_mid_attention_is_used_and_matches():
    """The attention is the one place a wrong scale or a transposed layout hides; turning it off must
    change the output (else the comparison above could pass without it)."""
    cfg = dict(CONFIGS[0])
    peer, ours = _pair(cfg)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = ours(x)
        ours.encoder.mid_block.attentions[0].to_out[0].weight.zero_()
        ours.encoder.mid_block.attentions[0].to_out[0].bias.zero_()
        assert (ours(x) - full).abs().max() > 1e-3


def test_gradients_flow_to_every_parameter():
    _, ours = _pair(CONFIGS[0])
    x = torch.randn(1, 3, 16, 16)
    post = ours.encode(x)
    loss = ours.decode(post.sample(torch.Generator().manual_seed(0))).square().mean() + post.kl().mean()
    loss.backward()
    missing = [n for n, p in ours.named_parameters() if p.grad is None or not torch.isfinite(p.grad).all()]
    assert not missing, missing


def test_config_defaults_and_scaling():
    ae = AutoencoderKL(block_out_channels=(32, 32, 32), norm_num_groups=8, latent_channels=4, scaling_factor=0.5)
    assert ae.downsampling_factor == 4 and ae.scaling_factor == 0.5
    assert ae.config["down_block_types"] == ("DownEncoderBlock2D",) * 3
    assert "f=4" in repr(ae)


def test_bad_input_errors():
    ae = AutoencoderKL(block_out_channels=(32, 32, 32), norm_num_groups=8, latent_channels=4)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, H, W\), got \(1, 4, 16, 16\)"):
        ae.encode(torch.zeros(1, 4, 16, 16))
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4, got 18x16"):
        ae.encode(torch.zeros(1, 3, 18, 16))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 4, H, W\), got \(1, 3, 4, 4\)"):
        ae.decode(torch.zeros(1, 3, 4, 4))
    with pytest.raises(ValueError, match="floating-point"):
        ae.encode(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    with pytest.raises(TypeError, match="must be a torch.Tensor"):
        ae.decode([[0.0]])


def test_bad_config_errors():
    with pytest.raises(ValueError, match="unknown AutoencoderKL config field"):
        AutoencoderKL(block_out_channel=(32,))
    with pytest.raises(ValueError, match="norm_num_groups=32 must divide"):
        AutoencoderKL(block_out_channels=(48,))
    with pytest.raises(ValueError, match="act_fn must be 'silu'"):
        AutoencoderKL(block_out_channels=(32,), act_fn="gelu")
    with pytest.raises(ValueError, match="down_block_types must be 2 x 'DownEncoderBlock2D'"):
        AutoencoderKL(block_out_channels=(32, 32), down_block_types=("DownEncoderBlock2D",))
    with pytest.raises(ValueError, match="latent_channels must be a positive int, got 0"):
        AutoencoderKL(block_out_channels=(32,), latent_channels=0)


def _same_state(a: dict, b: dict):
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_diffusers_folder_round_trip(tmp_path):
    """diffusers folder -> fastdiff.load_model -> export -> diffusers -> fastdiff: bitwise weights,
    config kept (scaling_factor included), and the loaded model computes what diffusers does."""
    import fastdiff
    from fastdiff.interop import export_autoencoder

    peer, _ = _pair(CONFIGS[1])
    peer.save_pretrained(tmp_path / "peer")
    loaded, info = fastdiff.load_model(tmp_path / "peer")
    assert isinstance(loaded, AutoencoderKL) and info["format"] == "diffusers"
    _same_state(loaded.state_dict(), peer.state_dict())
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        _close(loaded(x), peer(x).sample)
    loaded.scaling_factor = 0.7  # e.g. set from data after training
    export_autoencoder(loaded, tmp_path / "ours")
    back = diffusers.AutoencoderKL.from_pretrained(tmp_path / "ours")
    _same_state(back.state_dict(), peer.state_dict())
    assert back.config.scaling_factor == 0.7
    assert tuple(back.config.block_out_channels) == (32, 64, 64) and back.config.latent_channels == 3
    back.save_pretrained(tmp_path / "again")
    again, _ = fastdiff.load_model(tmp_path / "again")
    _same_state(again.state_dict(), loaded.state_dict())
    assert again.scaling_factor == 0.7 and again.downsampling_factor == 4
    z = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(again.decode(z), loaded.decode(z))


def test_old_attention_names_load(tmp_path):
    """Folders saved before diffusers 0.14 name the attention query/key/value/proj_attn."""
    import fastdiff
    from safetensors.torch import save_file

    peer, ours = _pair(CONFIGS[0])
    peer.save_pretrained(tmp_path)
    old = {k.replace("to_q", "query").replace("to_k", "key").replace("to_v", "value").replace("to_out.0", "proj_attn"): v
           for k, v in ours.state_dict().items()}
    assert any(".query." in k for k in old)
    save_file({k: v.contiguous() for k, v in old.items()}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    loaded, _ = fastdiff.load_model(tmp_path)
    _same_state(loaded.state_dict(), ours.state_dict())


def test_bad_folder_errors(tmp_path):
    import json

    import fastdiff
    from fastdiff.errors import InputError
    from fastdiff.interop import export_autoencoder

    peer, ours = _pair(CONFIGS[0])
    peer.save_pretrained(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(config, latent_channels=2)))
    with pytest.raises(InputError, match="the weights do not fit the config"):
        fastdiff.load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(dict(config, frobnicate=1)))
    with pytest.raises(InputError, match=r"config.json: unknown AutoencoderKL config field\(s\) \['frobnicate'\]"):
        fastdiff.load_model(tmp_path / "a")
    (tmp_path / "a" / "config.json").write_text(json.dumps(config))
    (tmp_path / "a" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(InputError, match="no weights"):
        fastdiff.load_model(tmp_path / "a")
    with pytest.raises(Exception, match="exists and is not an empty folder"):
        export_autoencoder(ours, tmp_path / "a")
    with pytest.raises(TypeError, match="must be a fastdiff.models.AutoencoderKL"):
        export_autoencoder(torch.nn.Linear(1, 1), tmp_path / "b")
