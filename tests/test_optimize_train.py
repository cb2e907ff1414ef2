"""The compiled training step: CompiledUpdate (clip + AdamW + EMA as compiled graphs) against
torch's own eager AdamW, and `fastdiff train --compile` against the eager loop: the same weights
up to float rounding, the same checkpoints (form and meaning), and a bitwise exact resume.

Dynamo and AOTAutograd run here with backend "aot_eager" (their trace, the eager kernels):
inductor's code generation takes minutes for a U-Net on 2 shared cores. The one inductor test
compiles the update of a few small parameters only."""
from pathlib import Path

import pytest
import torch
import torch._dynamo.testing
from safetensors.torch import load_file

from fastdiff.models.unet import UNet
from fastdiff.optimization import CompiledUpdate
from fastdiff.train import TrainConfig, read_checkpoint_record, train
from fastdiff.train.ema import ema_update


def _tiny_unet():
    torch.manual_seed(0)
    return UNet(in_channels=3, model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(4,),
                num_groups=4, num_classes=3, image_size=8, dropout=0.0)


def _setup():
    model = _tiny_unet()
    ema = _tiny_unet().requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01, foreach=True)
    return model, ema, opt


def _backward(model, step):
    gen = torch.Generator().manual_seed(step)
    x, t = torch.randn(2, 3, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen)
    (model(x, t, y=torch.tensor([0, 2])) - torch.randn(2, 3, 8, 8, generator=gen)).square().mean().backward()


# (lr, EMA rate) per step: both change every step, as in warm-up, and must not recompile
SCHEDULE = [(1e-3, 0.5), (3e-3, 0.6), (2e-3, 0.9)]
CLIP = 0.05  # small enough that every step is clipped


def _eager_steps(model, ema, opt):
    for step, (lr, rate) in enumerate(SCHEDULE):
        opt.param_groups[0]["lr"] = lr
        opt.zero_grad(set_to_none=True)
        _backward(model, step)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        assert norm > CLIP
        opt.step()
        ema_update(ema, model, rate)


def _compiled_steps(model, ema, opt, backend):
    update = CompiledUpdate(opt, grad_clip=CLIP, ema=(ema, model), backend=backend)
    for step, (lr, rate) in enumerate(SCHEDULE):
        opt.zero_grad(set_to_none=True)
        _backward(model, step)
        assert update(lr, rate) is True


def _assert_same_state(a, b, rtol, atol):
    (model_a, ema_a, opt_a), (model_b, ema_b, opt_b) = a, b
    for (name, p), q in zip(model_a.named_parameters(), model_b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=name)
    for (name, p), q in zip(ema_a.named_parameters(), ema_b.parameters()):
        torch.testing.assert_close(p, q, rtol=rtol, atol=atol, msg=f"ema {name}")
    sa, sb = opt_a.state_dict(), opt_b.state_dict()
    assert sa["param_groups"] == sb["param_groups"]  # the checkpoint's optimizer record
    assert sa["state"].keys() == sb["state"].keys()
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        for key, value in sa["state"][pid].items():
            other = sb["state"][pid][key]
            assert value.dtype == other.dtype and value.device == other.device, (pid, key)
            torch.testing.assert_close(value, other, rtol=rtol, atol=atol, msg=f"{pid}.{key}")


def test_compiled_update_equals_torch_adamw_and_compiles_once():
    torch.set_num_threads(1)  # restored by conftest
    eager = _setup()
    _eager_steps(*eager)
    torch._dynamo.reset()
    counter = torch._dynamo.testing.CompileCounter()  # a backend that counts the graphs it is given
    compiled = _setup()
    _compiled_steps(*compiled, backend=counter)
    # the norm, the update, the EMA: three graphs for all three steps (lr and rate are tensors)
    assert counter.frame_count == 3, counter.frame_count
    # same formulas as torch's foreach AdamW, in its capturable arrangement: rounding only
    # (an AdamW step moves a weight by ~lr, so a wrong formula would show at ~1e-3)
    _assert_same_state(eager, compiled, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_norm_skips_the_step():
    model, ema, opt = _setup()
    update = CompiledUpdate(opt, grad_clip=1.0, ema=(ema, model), backend="eager")
    _backward(model, 0)
    next(model.parameters()).grad[0] = float("nan")
    before = [p.detach().clone() for p in model.parameters()]
    assert update(1e-3, 0.9) is False
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.state  # AdamW's state is created by the first applied step, not before


def test_bad_arguments_are_named():
    model = _tiny_unet()
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.AdamW, got SGD"):
        CompiledUpdate(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(ValueError, match=r"optimizer options \['amsgrad'\] are not supported"):
        CompiledUpdate(torch.optim.AdamW(model.parameters(), amsgrad=True))
    with pytest.raises(ValueError, match="grad_clip must be a finite number >= 0"):
        CompiledUpdate(torch.optim.AdamW(model.parameters()), grad_clip=-1.0)
    model, ema, opt = _setup()
    update = CompiledUpdate(opt, ema=(ema, model), backend="eager")
    with pytest.raises(ValueError, match="ema_rate is needed"):
        update(1e-3)
    with pytest.raises(ValueError, match="compile must be None or one of"):
        TrainConfig(data="shapes", out="x", steps=1, compile="tvm").validate()


def test_inductor_update_of_small_parameters_equals_torch_adamw():
    """Inductor's generated code for the update (a few small tensors: seconds to compile)."""
    torch.set_num_threads(1)

    def setup():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3))
        ema = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3)).requires_grad_(False)
        return model, ema, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=True)

    def backward(model, step):
        gen = torch.Generator().manual_seed(step)
        model(torch.randn(4, 6, generator=gen)).square().sum().backward()

    runs = []
    for compiled in (False, True):
        torch._dynamo.reset()
        model, ema, opt = setup()
        update = CompiledUpdate(opt, grad_clip=0.5, ema=(ema, model), backend="inductor") if compiled else None
        for step, (lr, rate) in enumerate(SCHEDULE):
            opt.zero_grad(set_to_none=True)
            backward(model, step)
            if compiled:
                update(lr, rate)
            else:
                opt.param_groups[0]["lr"] = lr
                torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
                opt.step()
                ema_update(ema, model, rate)
        runs.append((model, ema, opt))
    _assert_same_state(*runs, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- fastdiff train --compile
# dropout 0: a compiled graph may draw dropout masks differently from eager (inductor's RNG)
# a small two-level U-Net at 12x12 keeps the traces short (each run traces it; later runs reuse the graphs)
RUN = dict(data="shapes", dataset_size=16, batch_size=4, preset="tiny", image_size=12, progress=False, T=50,
           warmup_steps=2, dropout=0.0, class_cond=True, sample_at_end=False, save_every=2, grad_clip=0.5,
           model=dict(model_channels=16, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(6,),
                      num_groups=4))


def _weights(out) -> dict:
    return load_file(str(Path(out) / read_checkpoint_record(out)["weights"]))


def test_train_compiled_matches_eager_and_resumes_bitwise(tmp_path):
    torch.set_num_threads(1)
    eager = train(TrainConfig(out=str(tmp_path / "eager"), steps=4, **RUN))
    torch._dynamo.reset()
    full = train(TrainConfig(out=str(tmp_path / "full"), steps=4, compile="aot_eager", **RUN))
    train(TrainConfig(out=str(tmp_path / "half"), steps=2, compile="aot_eager", **RUN))
    train(TrainConfig(out=str(tmp_path / "half"), steps=4, compile="aot_eager", resume=True, **RUN))
    w_eager, w_full, w_half = (_weights(tmp_path / k) for k in ("eager", "full", "half"))
    # the same checkpoint: tensors (model, EMA, optimizer state) and record
    assert w_eager.keys() == w_full.keys() and {k.split(".")[0] for k in w_full} >= {"model", "ema", "optim"}
    rec_eager, rec_full = read_checkpoint_record(tmp_path / "eager"), read_checkpoint_record(tmp_path / "full")
    assert rec_eager["optimizer"] == rec_full["optimizer"]  # param groups (lr, betas...) and scalars
    assert rec_full["config"]["compile"] == "aot_eager" and rec_eager["config"]["compile"] is None
    for k in w_eager:  # an AdamW step moves a weight by ~lr = 2e-4: rounding is far below that
        torch.testing.assert_close(w_full[k], w_eager[k], rtol=1e-4, atol=2e-6, msg=k)
    np_losses = [l for _, l in eager.losses], [l for _, l in full.losses]
    torch.testing.assert_close(torch.tensor(np_losses[1]), torch.tensor(np_losses[0]), rtol=1e-4, atol=0)
    # exact resume: 2 compiled steps, then 2 more after --resume == 4 in one run, bit for bit
    assert w_full.keys() == w_half.keys()
    for k in w_full:
        assert torch.equal(w_full[k], w_half[k]), k
