"""Teacher training by denoising score matching (DDPM, Ho et al. 2020; the paper's Eq. 1 with
lambda(t) = 1): the built-in SD-style teacher learns to predict eps (or v) with prompt dropout,
so that classifier-free guidance works at sampling time."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import field
from ..core.schedules import VPSchedule
from ..data.digits import prompt_for
from ..models.denoiser import Denoiser
from ..models.loading import save_teacher
from ..models.text import MINILM, TextEncoder
from ..models.unet import build_unet, digits_unet_config
from ..sample import seeded_noise, teacher_timesteps
from ..core.solvers import cfg_model, dpmpp_2m
from ..train import TrainConfig


def _teacher_train_defaults() -> TrainConfig:
    return TrainConfig(steps=950, batch_size=64, checkpoint_every=250, ema_decay=0.995)


@dataclass
class TeacherConfig:
    dataset: str = field("digits", "built-in dataset to train on")
    channels: list[int] = field([32, 64], "UNet block widths")
    beta_schedule: Literal["scaled_linear", "linear"] = field("scaled_linear", "noise schedule (SD uses scaled_linear)")
    prediction_type: Literal["epsilon", "v_prediction"] = field("epsilon", "what the UNet predicts")
    prompt_dropout: float = field(0.1, "probability of replacing the prompt by '' (enables CFG)")
    lr: float = field(2e-3, "AdamW learning rate (cosine-decayed to 10% over training)")
    weight_decay: float = field(0.0, "AdamW weight decay")
    text_max_length: int = field(16, "prompt tokens fed to cross-attention")
    preview_guidance: float = field(1.5, "default guidance scale (previews, sampling, evaluation)")
    train: TrainConfig = dc_field(default_factory=_teacher_train_defaults, metadata={"help": "training loop"})

    def validate(self):
        if self.dataset != "digits":
            raise ValueError(f"unknown dataset {self.dataset!r}; expected one of ['digits']")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.channels or any(c <= 0 or c % 8 for c in self.channels):
            raise ValueError(f"channels must be positive multiples of 8, got {self.channels}")


class TeacherTraining:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.schedule = VPSchedule(beta_schedule=config.beta_schedule, prediction_type=config.prediction_type)
        self.text = TextEncoder(MINILM, config.text_max_length)
        with torch.random.fork_rng(devices=[]):  # initialisation is a function of the config's seed
            torch.manual_seed(config.train.seed)
            self.unet = build_unet(digits_unet_config(self.text.hidden_size, tuple(config.channels)))

    def models(self) -> dict:
        return {"unet": self.unet}

    def optimizer_settings(self, name: str) -> dict:
        return {"lr": self.config.lr, "weight_decay": self.config.weight_decay}

    def lr_factor(self, step: int) -> float:
        import math

        progress = step / max(1, self.config.train.steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def setup(self, device) -> None:
        self.device = device

    def _cond(self, prompts: list[str]) -> dict:
        return {"encoder_hidden_states": self.text.encode(prompts).to(self.device)}

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        x0 = batch["image"].to(self.device)
        b = x0.shape[0]
        drop = torch.rand(b, generator=generator) < self.config.prompt_dropout
        prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
        t = torch.randint(0, self.schedule.num_train_timesteps, (b,), generator=generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.from_x0(x0, x_t, t)
        denoiser = Denoiser(models["unet"], self.schedule)
        loss = F.mse_loss(denoiser.predict(x_t, t, self._cond(prompts)), target)
        return [("unet", loss)], {"loss": loss.detach()}

    @torch.no_grad()
    def preview(self, models: dict, generator: torch.Generator):
        unet = models["unet"]
        was_training = unet.training
        unet.eval()
        prompts = [prompt_for(d) for _ in range(4) for d in range(10)]
        x = seeded_noise((1, 8, 8), list(range(len(prompts)))).to(self.device)
        m = cfg_model(Denoiser(unet, self.schedule), self._cond(prompts), self._cond([""] * len(prompts)), self.config.preview_guidance)
        images = dpmpp_2m(m, x, teacher_timesteps(self.schedule, 32), self.schedule)
        unet.train(was_training)
        return images, 10

    def finalize(self, out_dir, models: dict) -> None:
        meta = {"text_encoder": MINILM, "max_length": self.config.text_max_length, "dataset": self.config.dataset,
                "image_shape": [1, 8, 8], "default_guidance": self.config.preview_guidance}
        save_teacher(out_dir, models["unet"], self.schedule, meta)
