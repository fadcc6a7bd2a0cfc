"""Real-size readiness (issue 14): one Flash training step on real-size backbones, measured.

Builds, with random weights and in code, a diffusers pipeline folder whose backbone has the real
architecture (diffusers' SD1.5 UNet config, the SDXL UNet config, the SD3-medium transformer
config) while its text encoders and VAE are tiny (their size does not matter here; the latents
have the real size: 64x64 for SD1.5, 128x128 for SDXL and SD3). Then runs ``flashdistill distill``
on it as a user would, for one optimizer step at batch 1 in Flash's last phase (distillation,
adversarial and DMD terms all on), and reads the run's ``memory.json`` (on CPU: the resident set
when training starts and its peak during training, apart from the loading transient) and the step's
wall time; the process's own peak RSS (loading included) comes from ``wait4``.

    .venv/bin/python scripts/scale.py --arch sd15 --variant lora lora-bf16 lora-bf16-ckpt
    .venv/bin/python scripts/scale.py --arch sdxl --variant lora-bf16-ckpt --out runs/scale

``--pythonpath DIR`` runs another checkout's ``src`` (how the "before" column of docs/scale.md was
measured). Results are appended to ``OUT/results.jsonl``; the projection to GPU memory is
``--project`` (docs/scale.md explains it).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

ARCHS = {
    "sd15": {"family": "sd", "latent": 64, "image": 512},
    "sdxl": {"family": "sdxl", "latent": 128, "image": 1024},
    "sd3": {"family": "sd3", "latent": 128, "image": 1024},
}
# Per method: the smallest run that reaches its heaviest training step at batch 1.
METHOD_SETS = {
    # phase 3 from step 0: distillation, adversarial and DMD terms all on
    "flash": ["--set", "train.steps=1", "--set", "K=4", "--set", "phase_steps=[0,0,0]"],
    "lcm": ["--set", "train.steps=1"],
    "splam": ["--set", "train.steps=1"],  # its EMA target is swapped into the student module
    # one step per stage: stage 0 (MSE onto an 8-step CFG teacher), then the adversarial stages
    # with their discriminator (a trainable copy of the teacher's encoder and mid block)
    "lightning": ["--set", "train.steps=4", "--set", "stage_steps=[1,1,1,1]", "--set", "teacher_steps=8",
                  "--set", "convert_steps=0"],
}
VARIANTS = {
    "lora": [],
    "lora-ckpt": ["--set", "train.gradient_checkpointing=true"],
    "lora-bf16": ["--dtype", "bf16"],
    "lora-bf16-ckpt": ["--dtype", "bf16", "--set", "train.gradient_checkpointing=true"],
    "full-bf16-ckpt": ["--full", "--dtype", "bf16", "--set", "train.gradient_checkpointing=true"],
}


def backbone(arch: str):
    """The real architecture with random weights (diffusers' configs of the released models)."""
    import diffusers

    if arch == "sd15":  # diffusers' UNet2DConditionModel defaults are SD1.5's UNet
        return diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768)
    if arch == "sdxl":
        return diffusers.UNet2DConditionModel(
            sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
    return diffusers.SD3Transformer2DModel(  # SD3-medium
        sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
        joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
        pos_embed_max_size=192)


def build_teacher(arch: str, out: Path) -> Path:
    """The pipeline folder (cached: built once per arch)."""
    if (out / "model_index.json").is_file():
        return out
    import diffusers
    import torch

    sys.path.insert(0, str(REPO / "tests"))
    import tiny_pipelines as tp  # tokenizers and tiny text encoders built in code

    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    latent_channels = 16 if arch == "sd3" else 4
    vae = AutoencoderKL(block_out_channels=[8, 8, 8, 8], in_channels=3, out_channels=3, latent_channels=latent_channels,
                        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
                        norm_num_groups=8, sample_size=ARCHS[arch]["image"], layers_per_block=1,
                        scaling_factor={"sd15": 0.18215, "sdxl": 0.13025, "sd3": 1.5305}[arch],
                        **({"shift_factor": 0.0609} if arch == "sd3" else {})).eval()
    net = backbone(arch).eval()
    sd = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
    if arch == "sd15":
        pipe = diffusers.StableDiffusionPipeline(
            vae=vae, text_encoder=tp.clip_text(hidden=768), tokenizer=tp.clip_tokenizer(), unet=net,
            scheduler=diffusers.DDIMScheduler(**sd, clip_sample=False, set_alpha_to_one=False),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    elif arch == "sdxl":
        pipe = diffusers.StableDiffusionXLPipeline(
            vae=vae, text_encoder=tp.clip_text(hidden=768), text_encoder_2=tp.clip_text(projection=True, hidden=1280),
            tokenizer=tp.clip_tokenizer(), tokenizer_2=tp.clip_tokenizer(), unet=net,
            scheduler=diffusers.EulerDiscreteScheduler(**sd))
    else:
        pipe = diffusers.StableDiffusion3Pipeline(
            transformer=net, scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), vae=vae,
            text_encoder=tp.clip_text(projection=True, hidden=768), tokenizer=tp.clip_tokenizer(),
            text_encoder_2=tp.clip_text(projection=True, hidden=1280), tokenizer_2=tp.clip_tokenizer(),
            text_encoder_3=None, tokenizer_3=None)
    pipe.save_pretrained(out, safe_serialization=True)
    params = sum(p.numel() for p in net.parameters())
    (out / "scale.json").write_text(json.dumps({"arch": arch, "backbone_params": params}))
    return out


def build_data(arch: str, out: Path) -> Path:
    if (out / "metadata.jsonl").is_file():
        return out
    import numpy as np
    from PIL import Image

    out.mkdir(parents=True, exist_ok=True)
    size = ARCHS[arch]["image"]
    rng = np.random.default_rng(0)
    lines = []
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(out / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": "a photo of a cat"}))
    (out / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return out


def run(arch: str, variant: str, root: Path, pythonpath: str | None, label: str, method: str = "flash") -> dict:
    teacher = build_teacher(arch, root / f"teacher-{arch}")
    data = build_data(arch, root / f"data-{arch}")
    out = root / f"run-{arch}-{'' if method == 'flash' else method + '-'}{variant}-{label}"
    cmd = [sys.executable, "-m", "flashdistill.cli", "distill", "--method", method, "--teacher", str(teacher),
           "--data", str(data), "--out", str(out), "--set", "train.batch_size=1",
           "--set", "preview_prompts=[\"a photo of a cat\"]", "--set", "train.checkpoint_every=1000",
           "--set", "train.log_every=1", *METHOD_SETS[method], *VARIANTS[variant]]
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    t0 = time.time()
    out.mkdir(parents=True, exist_ok=True)
    with (root / f"{out.name}.log").open("w") as log_file:
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS, whatever code it runs
    wall = time.time() - t0
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        print((root / f"{out.name}.log").read_text()[-3000:])
        raise SystemExit(f"{arch} {variant}: distill failed ({code})")
    # memory.json (this code's loop): the peak before the first step and the training peak
    memory = json.loads((out / "memory.json").read_text()) if (out / "memory.json").is_file() else {}
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    meta = json.loads((teacher / "scale.json").read_text())
    run_meta = json.loads((out / "flashdistill.json").read_text())
    disc = re.search(r"disc: ([\d,]+)", (root / f"{out.name}.log").read_text())
    row = {"arch": arch, "method": method, "variant": variant, "code": label, "backbone_params": meta["backbone_params"],
           "trainable_params": run_meta["trainable_params"],
           "disc_params": int(disc.group(1).replace(",", "")) if disc else 0, "load_peak_gb": memory.get("load_peak_gb"),
           "at_start_gb": memory.get("at_start_gb"), "train_peak_gb": memory.get("train_peak_gb"), "process_peak_gb": round(usage.ru_maxrss / 1e6, 3),
           "step_s": round(log[-1]["time"] - (log[-2]["time"] if len(log) > 1 else 0.0), 1),
           "step_times_s": [r["time"] for r in log], "run_wall_s": round(wall, 1),
           "backbone_fp32_gb": round(meta["backbone_params"] * 4 / 1e9, 3)}
    return row


# Published parameter counts (approximate) of the parts the measurement replaces with tiny ones:
# CLIP ViT-L/14 text 123M, OpenCLIP bigG text 695M, the SD/SDXL/SD3 VAEs 84M (SD3's T5-XXL, 4.76B,
# is optional and left out: a folder without text_encoder_3 runs CLIP only).
REAL_PARTS = {"sd15": {"text": 123.1e6, "vae": 83.7e6}, "sdxl": {"text": 817.7e6, "vae": 83.7e6},
              "sd3": {"text": 817.7e6, "vae": 83.8e6}}
GB = 1e9


def flash_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r.get("method", "flash") == "flash" and r["code"] == "main"]


def disc_params(root: Path, row: dict) -> int:
    """The discriminator head's parameter count, as the run printed it."""
    if "disc_params" in row:
        return row["disc_params"]
    log = root / f"run-{row['arch']}-{row['variant']}-{row['code']}.log"
    found = re.search(r"disc: ([\d,]+)", log.read_text()) if log.is_file() else None
    return int(found.group(1).replace(",", "")) if found else 0


def project(rows: list[dict], root: Path) -> list[dict]:
    """GPU memory of a Flash step, projected: frozen weights (teacher, real text encoders, VAE) in
    the dtype + 16 bytes per trainable parameter (float32 weight, gradient, Adam's two moments) +
    the step's activations, measured here on CPU under bf16 as the training peak minus what was
    resident when training started minus the 12 bytes per trainable parameter the step allocates
    (gradients and Adam moments). On a GPU, accelerate's bf16 autocast keeps activations in bf16
    whatever the frozen weights' dtype, so the bf16 measurement stands for both. CUDA's own context
    (about 0.5 GB) is not included."""
    acts, rows = {}, flash_rows(rows)
    for r in rows:
        if r["variant"].startswith("lora-bf16") and r.get("at_start_gb") is not None and r["code"] == "main":
            trainable = r["trainable_params"] + disc_params(root, r)
            acts[(r["arch"], r["variant"].endswith("ckpt"))] = r["train_peak_gb"] - r["at_start_gb"] - 12 * trainable / GB
    out = []
    for (arch, ckpt), act in sorted(acts.items()):
        r = next(r for r in rows if r["arch"] == arch and r["variant"].startswith("lora-bf16") and r["code"] == "main")
        n, lora, disc = r["backbone_params"], r["trainable_params"], disc_params(root, r)
        parts = REAL_PARTS[arch]["text"] + REAL_PARTS[arch]["vae"]
        for student in ("lora", "full"):
            for dtype, b in (("fp32", 4), ("bf16", 2)):
                trainable = (lora if student == "lora" else n) + disc
                frozen = b * (n + parts)
                out.append({"arch": arch, "student": student, "frozen_dtype": dtype, "checkpointing": ckpt,
                            "frozen_gb": round(frozen / GB, 2), "trainable_states_gb": round(16 * trainable / GB, 2),
                            "activations_gb": round(act, 2), "projected_gb": round((frozen + 16 * trainable) / GB + act, 1)})
    return out


WEIGHTS_PROBE = r"""
import json, sys, torch
from flashdistill.methods import method_module

def rss_gb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 1e9

before = rss_gb()
module = method_module("flash")
cfg, _ = module.build_config(sys.argv[1], "auto", {"dtype": sys.argv[2]} if sys.argv[2] != "fp32" else {})
m = module.Method(cfg)
seen, total = set(), 0
mods = [m.teacher.denoiser.backbone, *m.models().values()]
with torch.no_grad():
    for mod in mods:  # touch every weight, so that lazily mapped files are resident
        for p in mod.parameters():
            if p.data_ptr() not in seen:
                seen.add(p.data_ptr())
                total += p.numel() * p.element_size()
                p.float().sum()
teacher = sum(p.numel() * p.element_size() for p in m.teacher.denoiser.backbone.parameters() if not p.requires_grad)
print(json.dumps({"rss_gb": round(rss_gb() - before, 3), "unique_weight_gb": round(total / 1e9, 3),
                  "teacher_weight_gb": round(teacher / 1e9, 3)}))
"""


def weights(arch: str, root: Path, pythonpath: str | None, label: str, dtype: str) -> dict:
    """Memory held once teacher and student are built: the resident set added by building them
    (every weight touched) and the bytes of the distinct weight tensors of all models."""
    teacher = build_teacher(arch, root / f"teacher-{arch}")
    env = dict(os.environ, **({"PYTHONPATH": pythonpath} if pythonpath else {}))
    out = subprocess.run([sys.executable, "-c", WEIGHTS_PROBE, str(teacher), dtype], env=env, capture_output=True,
                         text=True, check=True)
    row = json.loads(out.stdout.strip().splitlines()[-1])
    return {"arch": arch, "variant": f"weights-{dtype}", "code": label, **row}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", nargs="+", choices=list(ARCHS), default=["sd15"])
    p.add_argument("--method", nargs="+", choices=list(METHOD_SETS), default=["flash"],
                   help="methods to run one training step of (lightning: one MSE step and one adversarial step)")
    p.add_argument("--variant", nargs="+", choices=list(VARIANTS), default=["lora", "lora-bf16-ckpt"])
    p.add_argument("--out", default=str(REPO / "runs" / "scale"), help="teachers, data, runs and results.jsonl")
    p.add_argument("--pythonpath", default=None, help="run flashdistill from this src folder (another checkout)")
    p.add_argument("--label", default="main", help="name of the code measured (e.g. 'before')")
    p.add_argument("--weights", nargs="*", choices=["fp32", "bf16"], default=None,
                   help="instead of a training step: the memory of building teacher and student (Flash LoRA) in these dtypes")
    p.add_argument("--project", action="store_true",
                   help="print the GPU projection from OUT/results.jsonl (and write OUT/projection.json) instead of measuring")
    args = p.parse_args(argv)
    root = Path(args.out)
    root.mkdir(parents=True, exist_ok=True)
    if args.project:
        rows = [json.loads(line) for line in (root / "results.jsonl").read_text().splitlines()]
        table = project(rows, root)
        (root / "projection.json").write_text(json.dumps(table, indent=2))
        for row in table:
            print(json.dumps(row))
        return 0
    jobs = ([(arch, "flash", dtype) for arch in args.arch for dtype in args.weights] if args.weights is not None
            else [(arch, method, v) for arch in args.arch for method in args.method for v in args.variant])
    for arch, method, variant in jobs:
        row = (weights(arch, root, args.pythonpath, args.label, variant) if args.weights is not None
               else run(arch, variant, root, args.pythonpath, args.label, method))
        print(json.dumps(row), flush=True)
        with (root / "results.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
