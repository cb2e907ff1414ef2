"""The step loop both trainers run (fastdiff.train.steps.run_steps), driven by a scripted run: which
steps are skipped, when checkpoints fall, when the run stops, and that both trainers use it."""
from types import SimpleNamespace

import pytest

from fastdiff.train.steps import run_steps, step_progress_bar


class ScriptedRun:
    """A run whose steps fail where `failing` says and whose checkpoints fail where `bad_saves` says."""

    def __init__(self, steps, save_every=3, max_nonfinite=10, failing=(), bad_saves=(), start_step=0,
                 out_of_time_at=None):
        self.config = SimpleNamespace(steps=steps, save_every=save_every, log_every=2, max_nonfinite=max_nonfinite,
                                      max_minutes=1.0)
        self.start_step, self.nonfinite, self.losses = start_step, 0, []
        self.failing, self.bad_saves, self.out_of_time_at = set(failing), set(bad_saves), out_of_time_at
        self.done, self.saved, self.after, self.messages = [], [], [], []

    def optimize(self, step):
        self.done.append(step)
        if step in self.failing:
            return "loss"
        self.losses.append((step, 1.0))
        return None

    def checkpoint(self, step):
        self.saved.append(step)
        return step not in self.bad_saves

    def out_of_time(self, t_start):
        return self.out_of_time_at is not None and len(self.done) >= self.out_of_time_at

    def progress_bar(self):
        return None

    def log(self, msg):
        self.messages.append(msg)

    def after_step(self, step):
        self.after.append(step)


def test_a_clean_run_does_every_step_and_saves_on_schedule():
    run = ScriptedRun(steps=10, save_every=3)
    out = run_steps(run)
    assert (out.step, out.status, out.message) == (10, "done", "")
    assert run.done == list(range(10))
    assert run.saved == [3, 6, 9]           # the final checkpoint is the trainer's, not the loop's
    assert run.after == list(range(1, 10))  # nothing is due after the last step
    assert out.steps_per_s > 0


def test_a_resumed_run_starts_where_it_stopped():
    run = ScriptedRun(steps=7, save_every=3, start_step=4)
    out = run_steps(run)
    assert run.done == [4, 5, 6] and run.saved == [6] and out.step == 7


def test_a_checkpoint_after_a_skipped_step_waits_for_a_good_one():
    run = ScriptedRun(steps=10, save_every=3, failing={2})
    out = run_steps(run)
    assert out.status == "done" and run.nonfinite == 1
    assert run.saved == [4, 6, 9]
    assert "step 2: non-finite loss, step skipped (1 so far, stopping above 10)" in run.messages


def test_too_many_skipped_steps_stop_the_run():
    run = ScriptedRun(steps=10, max_nonfinite=1, failing={1, 2, 3})
    out = run_steps(run)
    assert out.status == "nonfinite" and out.step == 3 and run.done == [0, 1, 2]


def test_a_checkpoint_that_finds_bad_weights_stops_the_run():
    run = ScriptedRun(steps=10, save_every=3, bad_saves={6})
    out = run_steps(run)
    assert out.status == "nonfinite" and out.step == 6 and run.saved == [3, 6]


def test_the_time_budget_stops_the_run():
    run = ScriptedRun(steps=100, out_of_time_at=5)
    out = run_steps(run)
    assert out.status == "time" and out.step == 5
    assert out.message == "stopped at step 5: the 1.0 minute budget ran out"


def test_a_run_bounded_by_the_clock_has_no_step_total():
    # the demos run steps=10**7 under max_minutes: a bar with that total would show an ETA of days
    bar = step_progress_bar(SimpleNamespace(steps=10 ** 7, max_minutes=9.0), 0, "train")
    assert bar.total is None
    bar.close()
    bar = step_progress_bar(SimpleNamespace(steps=100, max_minutes=None), 5, "train-autoencoder")
    assert (bar.total, bar.n) == (100, 5)
    bar.close()


@pytest.mark.parametrize("trainer", ["train", "train_autoencoder"])
def test_both_trainers_stop_on_their_time_budget(tmp_path, trainer):
    # a budget of ~0 minutes: each trainer stops after its first step with status "time"
    if trainer == "train":
        from fastdiff.train import TrainConfig, train
        result = train(TrainConfig(data="shapes", out=str(tmp_path / "run"), steps=50, preset="tiny", image_size=16,
                                   dataset_size=16, batch_size=2, max_minutes=1e-9, progress=False,
                                   sample_at_end=False, T=10, sample_steps=10))
    else:
        from fastdiff.train.autoencoder import AutoencoderConfig, train_autoencoder
        result = train_autoencoder(AutoencoderConfig(
            data="shapes", out=str(tmp_path / "run"), image_size=16, dataset_size=16, batch_size=2,
            block_out_channels=(8, 16), latent_channels=2, norm_num_groups=4, eval_n=4, scale_n=8, recon_n=2,
            steps=50, max_minutes=1e-9, progress=False, device="cpu"))
    assert result.status == "time" and result.step == 1
