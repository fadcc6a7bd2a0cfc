"""Teacher training by denoising score matching (DDPM, Ho et al. 2020; the paper's Eq. 1 with
lambda(t) = 1): the built-in SD-style teacher learns to predict eps (or v) with prompt dropout,
so that classifier-free guidance works at sampling time.

Conditional teachers (``task``, see :mod:`flashdistill.tasks`): ``inpaint`` and ``sr`` train a UNet
with the spatial condition joined to its input (and, for sr, noise levels as class labels);
``sketch`` trains only a T2I-Adapter on a frozen text-to-image teacher (``base``), with the cubic
timestep sampling of T2I-Adapter (Mou et al. 2024), which favours the early, structure-setting
steps. Prompt dropout drops the prompt only; the spatial condition is always there.

Fine-tunes (task t2i with ``base``): ``style`` transforms the training images (see
:mod:`flashdistill.styles`); with ``lora`` only a LoRA on the frozen base learns, and the folder is
a style LoRA that stacks on the base's students at inference (``sample --extra-lora``)."""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Literal

import torch
import torch.nn.functional as F

from ..config import field
from ..core.schedules import VPSchedule
from ..data.digits import prompt_for
from ..models.denoiser import Denoiser
from ..models.loading import load_teacher, save_lora, save_teacher
from ..models.student import make_student_backbone
from ..models.text import MINILM, TextEncoder
from ..models.unet import build_unet, digits_adapter_config, digits_unet_config
from ..sample import seeded_noise, teacher_timesteps
from ..core.solvers import cfg_model, dpmpp_2m
from ..styles import get_style
from ..tasks import TASKS, get_task, preview_condition
from ..train import TrainConfig


def _teacher_train_defaults() -> TrainConfig:
    return TrainConfig(steps=950, batch_size=64, checkpoint_every=250, ema_decay=0.995)


@dataclass
class TeacherConfig:
    dataset: str = field("digits", "built-in dataset to train on")
    task: Literal["t2i", "inpaint", "sr", "sketch"] = field(
        "t2i", "t2i: text-to-image; inpaint: box masks (input [x_t, mask, masked image]); sr: x2 from 4x4 "
               "(input [x_t, low-res], noise level as class label); sketch: a T2I-Adapter on stroke maps, "
               "trained on the frozen teacher given by base")
    base: str = field("", "sketch: the text-to-image teacher folder the adapter is trained on (frozen); t2i: a "
                          "teacher to fine-tune (with lora: the frozen base of a LoRA) instead of training from scratch")
    style: Literal["none", "thick"] = field("none", "transform of the training images (thick: stroke thickening); "
                                                    "with base and lora, a style LoRA to stack on students")
    lora: bool = field(False, "t2i with base: train a LoRA on the frozen base teacher instead of every weight; the "
                              "folder is a LoRA (pytorch_lora_weights.safetensors) for sample/evaluate --extra-lora")
    lora_rank: int = field(8, "rank of the LoRA (lora)")
    lora_targets: list[str] = field(["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                                     "ff.net.2", "conv1", "conv2"],
                                    "module-name suffixes the LoRA wraps (lora; default: attention, feed-forward and "
                                    "the resnet convolutions)")
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
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {list(TASKS)}")
        if self.task == "sketch" and not self.base:
            raise ValueError("task sketch trains a T2I-Adapter on a frozen text-to-image teacher: pass --base DIR "
                             "(e.g. the folder of 'flashdistill train-teacher --out runs/teacher')")
        if self.base and self.task not in ("sketch", "t2i"):
            raise ValueError(f"base is for task sketch (the adapter's frozen teacher) or t2i (a teacher to fine-tune), "
                             f"not {self.task!r}")
        if self.lora and not (self.base and self.task == "t2i"):
            raise ValueError("lora trains a LoRA on a text-to-image teacher: pass --base DIR (a t2i teacher folder) "
                             f"with task t2i (got task {self.task!r}, base {self.base!r})")
        if self.style != "none" and self.task != "t2i":
            raise ValueError(f"style is for text-to-image teachers and LoRAs (task t2i), not task {self.task!r}")
        if self.lora_rank <= 0:
            raise ValueError(f"lora_rank must be > 0, got {self.lora_rank}")
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout must be in [0, 1), got {self.prompt_dropout}")
        if self.lr <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not self.channels or any(c <= 0 or c % 8 for c in self.channels):
            raise ValueError(f"channels must be positive multiples of 8, got {self.channels}")


class TeacherTraining:
    def __init__(self, config: TeacherConfig):
        self.config = config
        self.task = get_task(config.task)
        self.style = get_style(config.style)
        self.adapter = None
        if config.base:  # the adapter or LoRA learns on a frozen teacher; a plain fine-tune starts from it
            base = load_teacher(config.base)
            if base.meta.get("dataset") != config.dataset or base.task.name != "t2i":
                raise ValueError(f"base {config.base!r} must be a text-to-image {config.dataset} teacher, "
                                 f"got task {base.task.name!r} on {base.meta.get('dataset')!r}")
            self.schedule, self.text, self.unet = base.schedule, base.conditioner, base.denoiser.backbone
            self.base_meta = base.meta
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(config.train.seed)
                if config.task == "sketch":
                    from diffusers import T2IAdapter

                    self.adapter = T2IAdapter(**digits_adapter_config(tuple(self.unet.config.block_out_channels)))
                elif config.lora:
                    self.unet = make_student_backbone(self.unet, False, config.lora_rank, config.lora_rank,
                                                      config.lora_targets)
                else:
                    self.unet.float().requires_grad_(True).train()
            return
        self.schedule = VPSchedule(beta_schedule=config.beta_schedule, prediction_type=config.prediction_type)
        self.text = TextEncoder(MINILM, config.text_max_length)
        self.base_meta = {}
        with torch.random.fork_rng(devices=[]):  # initialisation is a function of the config's seed
            torch.manual_seed(config.train.seed)
            self.unet = build_unet(digits_unet_config(self.text.hidden_size, tuple(config.channels),
                                                      self.task.extra_channels, self.task.class_embeds))

    def models(self) -> dict:
        return {"adapter": self.adapter} if self.adapter is not None else {"unet": self.unet}

    def optimizer_settings(self, name: str) -> dict:
        return {"lr": self.config.lr, "weight_decay": self.config.weight_decay}

    def lr_factor(self, step: int) -> float:
        import math

        progress = step / max(1, self.config.train.steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    def setup(self, device) -> None:
        self.device = device
        self.unet.to(device)

    def _cond(self, prompts: list[str]) -> dict:
        return {"encoder_hidden_states": self.text.encode(prompts).to(self.device)}

    def _spatial(self, condition: dict, models: dict, generator) -> dict:
        condition = {k: v.to(self.device) for k, v in condition.items()}
        return self.task.kwargs(condition, models.get("adapter"), 1.0, generator)

    def _timesteps(self, b: int, generator) -> torch.Tensor:
        n = self.schedule.num_train_timesteps
        if self.adapter is not None:  # T2I-Adapter's cubic sampling: t = (1 - u^3) T
            u = torch.rand(b, generator=generator)
            return ((1 - u ** 3) * n).long().clamp(0, n - 1)
        return torch.randint(0, n, (b,), generator=generator)

    def step(self, batch: dict, step: int, models: dict, generator: torch.Generator):
        x0 = self.style(batch["image"]).to(self.device)
        b = x0.shape[0]
        drop = torch.rand(b, generator=generator) < self.config.prompt_dropout
        prompts = ["" if d else p for p, d in zip(batch["prompt"], drop.tolist())]
        spatial = self._spatial(self.task.make(batch["image"], generator), models, generator)
        t = self._timesteps(b, generator).to(self.device)
        noise = torch.randn(x0.shape, generator=generator).to(self.device)
        x_t = self.schedule.add_noise(x0, noise, t)
        target = self.schedule.from_x0(x0, x_t, t)
        denoiser = Denoiser(models.get("unet", self.unet), self.schedule)
        loss = F.mse_loss(denoiser.predict(x_t, t, {**self._cond(prompts), **spatial}), target)
        return [(next(iter(models)), loss)], {"loss": loss.detach()}

    @torch.no_grad()
    def preview(self, models: dict, generator: torch.Generator):
        """Text-to-image: 4 rows of the ten digits. Conditional: the conditions of ten test digits,
        then 3 rows of samples for them."""
        trained = next(iter(models.values()))
        was_training = trained.training
        trained.eval()
        unet = models.get("unet", self.unet)
        rows = 4
        spatial, shown = {}, []
        if self.task.keys:
            rows = 3
            condition = preview_condition(self.task)
            shown = [self.task.show(condition).to(self.device)]
            repeated = {k: torch.cat([v] * rows) for k, v in condition.items()}
            spatial = self._spatial(repeated, models, torch.Generator().manual_seed(0))
        prompts = [prompt_for(d) for _ in range(rows) for d in range(10)]
        x = seeded_noise((1, 8, 8), list(range(len(prompts)))).to(self.device)
        m = cfg_model(Denoiser(unet, self.schedule), {**self._cond(prompts), **spatial},
                      {**self._cond([""] * len(prompts)), **spatial}, self.config.preview_guidance)
        images = dpmpp_2m(m, x, teacher_timesteps(self.schedule, 32), self.schedule)
        trained.train(was_training)
        return torch.cat([*shown, images]), 10

    def finalize(self, out_dir, models: dict) -> None:
        meta = {"text_encoder": MINILM, "max_length": self.config.text_max_length, "dataset": self.config.dataset,
                "image_shape": [1, 8, 8], "default_guidance": self.config.preview_guidance, "task": self.task.name}
        if self.config.style != "none":
            meta["style"] = self.config.style
        if self.config.base:
            meta.update(max_length=self.base_meta["max_length"], base=str(self.config.base))
        if self.config.lora:
            save_lora(out_dir, models["unet"], {**meta, "rank": self.config.lora_rank, "alpha": self.config.lora_rank})
            return
        if self.adapter is not None:
            meta["adapter_scale"] = 1.0
        save_teacher(out_dir, self.unet if self.adapter is not None else models["unet"], self.schedule, meta,
                     adapter=models.get("adapter"))
