"""Training: the run config (`config`), the loop (`loop`), checkpoints with exact resume
(`checkpoint`), DDP (`distributed`), EMA (`ema`), and the auxiliary networks' loop
(`auxiliary`: the noisy classifier, the shapes feature CNN)."""
from fastdiff.train.checkpoint import (CHECKPOINT_JSON, load_checkpoint, read_checkpoint_record,
                                       save_checkpoint)
from fastdiff.train.config import (DEFAULT_GUIDANCE_SCALE, TrainConfig, TrainResult, build_diffusion, build_model,
                                   config_from_dict, lr_at)
from fastdiff.train.loop import train, write_samples

__all__ = ["CHECKPOINT_JSON", "DEFAULT_GUIDANCE_SCALE", "TrainConfig", "TrainResult", "build_diffusion",
           "build_model", "config_from_dict", "load_checkpoint", "lr_at", "read_checkpoint_record",
           "save_checkpoint", "train", "write_samples"]
