"""Real-backbone paths on tiny pipelines built in code (SD1.5-style, SDXL, PixArt-alpha, SD3):
loading into the one denoiser convention, Flash for 3 steps, sampling, export, and the diffusers
round trip (the exported files in the diffusers pipeline give our sampler's output)."""
import json

import pytest
import torch

import tiny_pipelines as tp

FAMILIES = ["sd", "sdxl", "pixart", "sd3"]


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipelines")
    return {f: tp.build(f, root / f) for f in FAMILIES}


def _pipe(path, family):
    import diffusers

    extra = {"text_encoder_3": None, "tokenizer_3": None} if family == "sd3" else {}
    if family == "sd":
        extra = {"safety_checker": None, "requires_safety_checker": False}
    return diffusers.DiffusionPipeline.from_pretrained(str(path), **extra)


def _noise(model, n, seed):
    return torch.randn(n, *model.image_shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", FAMILIES)
def test_teacher_sampling_matches_the_pipeline_with_cfg(teachers, family):
    """Our solver + CFG over the adapter equals the diffusers pipeline from the same latents: the
    conditioning (pooled, time ids, masks), the unconditional branch and the schedule all agree."""
    import diffusers

    from flashdistill.core.solvers import cfg_model, ddim, flow_euler
    from flashdistill.models.loading import load_model
    from flashdistill.sample import teacher_timesteps

    model = load_model(teachers[family])
    assert model.meta["family"] == family and model.image_shape == (4, 8, 8)
    pipe = _pipe(teachers[family], family)
    # 4 steps: trailing timesteps [999, 749, 499, 249], where diffusers' DDIM also ends at alpha = 1
    # (with 3 it stops at t = 0, one step short of the clean sample).
    if family == "sd3":
        solver, ts = flow_euler, model.schedule.timesteps(4)
    else:
        pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                             set_alpha_to_one=True, clip_sample=False)
        solver, ts = ddim, teacher_timesteps(model.schedule, 4)
    prompts, w, lat = ["a cat", "a red car"], 3.0, _noise(model, 2, 0)
    kw = {"use_resolution_binning": False} if family == "pixart" else {}
    ref = pipe(prompts, num_inference_steps=4, guidance_scale=w, latents=lat.clone(), output_type="latent", **kw).images
    with torch.no_grad():
        ours = solver(cfg_model(model.denoiser, model.cond(prompts), model.uncond(2), w), lat, ts, model.schedule)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def _tiny_data(n=4):
    g = torch.Generator().manual_seed(0)
    return [{"image": torch.rand(3, tp.IMAGE_SIZE, tp.IMAGE_SIZE, generator=g) * 2 - 1, "prompt": p}
            for p in ["a cat", "a red car", "a dog", "a lake"][:n]]


METHOD_SETTINGS = {"flash": {"K": 8, "phase_steps": [1, 1, 1]}, "lcm": {"N": 10}, "splam": {"N": 10, "gamma_dim": 8}}
ROUND_TRIPS = [("flash", f) for f in FAMILIES] + [("lcm", f) for f in FAMILIES] + [("splam", "sd"), ("splam", "sdxl")]


@pytest.mark.parametrize("method_name,family", ROUND_TRIPS)
def test_distil_sample_export_round_trip(teachers, method_name, family, tmp_path):
    import diffusers
    from safetensors.torch import load_file

    from flashdistill.exporting import export
    from flashdistill.methods import method_module
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps
    from flashdistill.sample import sample
    from flashdistill.train import train

    module = method_module(method_name)
    cfg, preset = module.build_config(teachers[family], "auto", {
        **METHOD_SETTINGS[method_name], "lora_rank": 2, "lr": 1e-2,
        "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 3, "log_every": 1}})
    assert preset == family
    method = module.Method(cfg)
    assert 0 < method.trainable < method.total
    run = tmp_path / "run"
    train(method, _tiny_data(), run, progress=False)
    logs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(logs) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in logs)
    lora = load_file(str(run / "student" / "student_lora.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in lora.items() if "lora_B" in k)  # B starts at zero: it moved

    student = load_model(run)
    for n in (1, 2, 4):
        images = sample(student, ["a cat", "a dog"], [0, 1], n)
        assert images.shape == (2, 3, tp.IMAGE_SIZE, tp.IMAGE_SIZE) and torch.isfinite(images).all()

    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"# {module.Method.label} student" in card and "## Settings" in card and "## Metrics" in card
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    pipe = _pipe(teachers[family], family)
    if family == "pixart":
        assert (out / "transformer").is_dir()
        pipe.transformer = diffusers.PixArtTransformer2DModel.from_pretrained(out, subfolder="transformer")
    else:
        assert (out / "pytorch_lora_weights.safetensors").is_file()
        pipe.load_lora_weights(out)
    pipe.scheduler = getattr(diffusers, sched["_class_name"]).from_pretrained(out, subfolder="scheduler")
    prompts = ["a cat", "a red car"]
    for n in (1, 2, 4):
        ts = student_timesteps(student.sampling, n)
        lat = _noise(student, 2, 5)
        kw = {"sigmas": (ts / 1000).tolist()} if family == "sd3" else {"timesteps": ts.long().tolist()}
        if family == "pixart":
            kw["use_resolution_binning"] = False
        # LCMScheduler draws its re-noising noise from the pipeline's generator; the SD3 pipeline
        # does not pass one to its scheduler, so FlowMatchLCMScheduler draws from the global RNG.
        torch.manual_seed(7)
        ref = pipe(prompts, num_inference_steps=n, guidance_scale=1.0, latents=lat.clone(),
                   generator=torch.Generator().manual_seed(7), output_type="latent", **kw).images
        torch.manual_seed(7)
        g = None if family == "sd3" else torch.Generator().manual_seed(7)
        noises = [torch.randn(lat.shape, generator=g) for _ in range(n)]
        with torch.no_grad():
            ours = lcm_multistep(student.denoiser, lat, ts, student.cond(prompts), student.schedule, noises)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_full_lcm_w_embedding_round_trip_in_the_stock_pipeline(teachers, family, tmp_path):
    """A full LCM student with its w-embedding: the exported UNet (time_cond_proj_dim) in the stock
    pipeline at guidance_scale g (which then embeds g instead of running CFG) gives our sampler's
    output at g, for two scales."""
    import diffusers

    from flashdistill.exporting import export
    from flashdistill.methods import method_module
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps, w_condition
    from flashdistill.train import train

    module = method_module("lcm")
    cfg, _ = module.build_config(teachers[family], "auto", {
        "N": 10, "full": True, "full_lr": 1e-3, "guidance_range": [2.0, 9.0], "w_embedding_dim": 32,
        "train": {"steps": 2, "batch_size": 2, "checkpoint_every": 2, "log_every": 1}})
    run = tmp_path / "run"
    train(module.Method(cfg), _tiny_data(), run, progress=False)
    student = load_model(run)
    assert student.denoiser.backbone.time_embedding.cond_proj.weight.abs().max() > 0
    out = export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert "guidance_scale=8.5" in card and "[2, 9]" in card
    assert ", lr 0.001\n" in card  # the full student's own learning rate (full_lr), not the LoRA's lr
    pipe = _pipe(teachers[family], family)
    pipe.unet = diffusers.UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    assert pipe.unet.config.time_cond_proj_dim == 32
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(out, subfolder="scheduler")
    prompts, n = ["a cat", "a red car"], 2
    ts = student_timesteps(student.sampling, n)
    outputs = []
    for g in (3.0, 8.5):
        lat = _noise(student, 2, 5)
        ref = pipe(prompts, num_inference_steps=n, timesteps=ts.long().tolist(), guidance_scale=g, latents=lat.clone(),
                   generator=torch.Generator().manual_seed(7), output_type="latent").images
        gen = torch.Generator().manual_seed(7)
        noises = [torch.randn(lat.shape, generator=gen) for _ in range(n)]
        cond = {**student.cond(prompts), **w_condition(student.sampling, 2, g)}
        with torch.no_grad():
            ours = lcm_multistep(student.denoiser, lat, ts, cond, student.schedule, noises)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)
        outputs.append(ours)
    assert not torch.equal(*outputs)  # the scale reaches the student
    import flashdistill as fd

    loaded = fd.load(run)  # the API's pipeline call: the student's own scale (8.5), no CFG
    assert loaded.pipeline_kwargs(n) == {"num_inference_steps": n, "guidance_scale": 8.5, "timesteps": ts.long().tolist()}
    lat = _noise(student, 2, 5)
    same = loaded.pipeline()(prompts, latents=lat.clone(), generator=torch.Generator().manual_seed(7),
                             output_type="latent", **loaded.pipeline_kwargs(n)).images
    torch.testing.assert_close(same, outputs[1], rtol=1e-4, atol=1e-5 * same.abs().max().item() + 1e-6)


@pytest.mark.parametrize("name,family,why", [("splam", "pixart", "needs a UNet time embedding"),
                                             ("splam", "sd3", "derived for VP schedules"),
                                             ("lightning", "pixart", "copies a UNet encoder and mid block"),
                                             ("lightning", "sd3", "written for VP schedules")])
def test_methods_refuse_backbones_they_do_not_apply_to(teachers, name, family, why):
    from flashdistill.methods import method_module

    module = method_module(name)
    cfg, _ = module.build_config(teachers[family], "auto", {"lora_rank": 2})
    with pytest.raises(ValueError, match=why):
        module.Method(cfg)


def test_unsupported_pipeline_and_missing_folder(tmp_path):
    from flashdistill.models.loading import ModelNotFound, load_model

    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyPipeline"}))
    with pytest.raises(ValueError, match="unsupported pipeline class 'KandinskyPipeline'"):
        load_model(tmp_path / "p")
    with pytest.raises(ModelNotFound, match="does not exist"):
        load_model(tmp_path / "nope")


def test_cli_distill_on_an_image_folder_then_export(teachers, tmp_path, capsys):
    from PIL import Image

    from flashdistill.cli import main

    data = tmp_path / "data"
    data.mkdir()
    lines = []
    for i, prompt in enumerate(["a cat", "a red car", "a dog", "a lake"]):
        Image.new("RGB", (20, 24), (60 * i, 20, 200)).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": prompt}))
    (data / "metadata.jsonl").write_text("\n".join(lines))
    run, out = tmp_path / "run", tmp_path / "export"
    args = ["distill", "--teacher", str(teachers["sd"]), "--data", str(data), "--out", str(run),
            "--set", "K=8", "--set", "lora_rank=2", "--set", "phase_steps=[1,1,1]", "--set", "train.steps=2",
            "--set", "train.batch_size=2", "--set", "train.checkpoint_every=2"]
    assert main(args) == 0
    assert "data: 4 captioned images" in capsys.readouterr().out
    assert main(["export", "--model", str(run), "--out", str(out)]) == 0
    assert (out / "pytorch_lora_weights.safetensors").is_file() and (out / "scheduler").is_dir()
    assert main(["export", "--model", str(run), "--out", str(out)]) == 2  # refuses a non-empty folder
    assert "not empty" in capsys.readouterr().err
    no_data = ["distill", "--teacher", str(teachers["sd"]), "--out", str(tmp_path / "r2")]
    assert main(no_data) == 2
    assert "pass --data PATH" in capsys.readouterr().err


def test_accelerate_config_files_parse():
    from pathlib import Path

    from accelerate.commands.config.config_args import ClusterConfig

    root = Path(__file__).resolve().parent.parent / "configs"
    ddp = ClusterConfig.from_yaml_file(root / "accelerate_ddp.yaml")
    fsdp = ClusterConfig.from_yaml_file(root / "accelerate_fsdp.yaml")
    assert ddp.distributed_type.value == "MULTI_GPU" and fsdp.distributed_type.value == "FSDP"
    assert fsdp.fsdp_config["fsdp_use_orig_params"] is True


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_lightning_stages_export_and_diffusers_euler_round_trip(teachers, family, tmp_path):
    """Every stage of a Lightning run exports to its own folder; a stock pipeline with the stage's
    LoRA and its EulerDiscreteScheduler (trailing; prediction_type "sample" at 1 step) reproduces
    the toolkit's deterministic samples."""
    import diffusers

    from flashdistill.exporting import export
    from flashdistill.methods import lightning
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps
    from flashdistill.train import train

    cfg, _ = lightning.build_config(teachers[family], "auto", {
        "lora_rank": 2, "teacher_steps": 4, "stages": [2, 1], "stage_steps": [1, 2], "convert_steps": 1,
        "lr": 1e-2, "mse_lr": 1e-2, "disc_lr": 1e-2, "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 3}})
    run = tmp_path / "run"
    train(lightning.Method(cfg), _tiny_data(), run, progress=False)
    out = export(run, tmp_path / "export")
    pipe = _pipe(teachers[family], family)
    prompts = ["a cat", "a red car"]
    for n in (2, 1):
        student = load_model(run / "stages" / str(n))
        sched = json.loads((out / f"{n}-step" / "scheduler" / "scheduler_config.json").read_text())
        assert sched["_class_name"] == "EulerDiscreteScheduler" and sched["timestep_spacing"] == "trailing"
        assert sched["prediction_type"] == ("sample" if n == 1 else "epsilon")
        pipe.load_lora_weights(out / f"{n}-step")
        pipe.scheduler = diffusers.EulerDiscreteScheduler.from_pretrained(out / f"{n}-step", subfolder="scheduler")
        lat = _noise(student, 2, 5)
        # diffusers' trailing Euler starts from sigma_max * latents, which its scale_model_input
        # turns into sigma_max / sqrt(sigma_max^2 + 1) * latents (0.9977 on SD's schedule): the
        # trained start, pure noise (Eq. 24), is reached by dividing the latents by that factor
        pipe.scheduler.set_timesteps(n)
        sig = float(pipe.scheduler.init_noise_sigma)
        start = lat * ((sig**2 + 1) ** 0.5 / sig)
        ref = pipe(prompts, num_inference_steps=n, guidance_scale=1.0, latents=start, output_type="latent").images
        pipe.unload_lora_weights()
        ts = student_timesteps(student.sampling, n)
        with torch.no_grad():
            ours = lcm_multistep(student.denoiser, lat, ts, student.cond(prompts), student.schedule, None, gamma=0.0)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item() + 1e-6)


def _image_folder(root, prompts=("a cat", "a red car", "a dog")):
    from PIL import Image

    root.mkdir()
    lines = []
    for i, prompt in enumerate(prompts):
        Image.new("RGB", (20 + 4 * i, 24), (60 * i, 20, 200 - 30 * i)).save(root / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": prompt}))
    (root / "metadata.jsonl").write_text("\n".join(lines))
    return root


def _lora(run):
    from safetensors.torch import load_file

    return load_file(str(run / "student" / "student_lora.safetensors"))


def test_cached_latents_train_exactly_as_uncached_and_skip_the_vae(teachers, tmp_path, monkeypatch, capsys):
    """--cache-latents: a run from the cache is the uncached run (the cache encoded at batch 1, as
    the run does, so the VAE sees the same shapes), and training never calls the VAE or the text
    encoders; the CLI builds a missing cache itself."""
    from flashdistill.cli import main
    from flashdistill.data.cache import build_cache
    from flashdistill.data.images import load_image_dataset
    from flashdistill.models.loading import load_teacher
    from flashdistill.models.pipelines import PipelineConditioner, PipelineVAE

    data = _image_folder(tmp_path / "data")
    common = ["--teacher", str(teachers["sd"]), "--data", str(data), "--set", "K=8", "--set", "lora_rank=2",
              "--set", "phase_steps=[0,1,1]", "--set", "train.steps=3", "--set", "train.batch_size=1",
              "--set", "train.checkpoint_every=2", "--set", "preview_prompts=[\"a cat\"]"]
    assert main(["distill", "--out", str(tmp_path / "plain"), *common]) == 0
    teacher = load_teacher(teachers["sd"])
    cache = build_cache(load_image_dataset(data, teacher.meta["image_size"]), teacher, tmp_path / "cache", str(data),
                        batch_size=1, progress=False)

    def forbidden(*a, **k):
        raise AssertionError("the VAE ran during a cached run")

    monkeypatch.setattr(PipelineVAE, "moments", forbidden)
    calls = []
    real = PipelineConditioner.encode_one
    monkeypatch.setattr(PipelineConditioner, "encode_one", lambda self, p: (calls.append(p), real(self, p))[1])
    assert main(["distill", "--out", str(tmp_path / "cached"), "--cache-latents", str(cache), *common]) == 0
    plain, cached = _lora(tmp_path / "plain"), _lora(tmp_path / "cached")
    assert plain.keys() == cached.keys() and all(torch.equal(plain[k], cached[k]) for k in plain)
    assert set(calls) <= {"", "a cat"}  # only the unconditional branch and the preview prompt were encoded
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["distill", "--out", str(tmp_path / "built"), "--cache-latents", str(tmp_path / "cache2"), *common]) == 0
    assert "cache: latents and text embeddings" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "cache2").iterdir()) == ["cache.json", "shard-00000.json", "shard-00000.safetensors"]


def test_latent_cache_resumes_an_interrupted_build_and_refuses_other_inputs(teachers, tmp_path, monkeypatch):
    from flashdistill.data.cache import CacheMismatch, CachedLatents, build_cache
    from flashdistill.data.images import load_image_dataset
    from flashdistill.models.loading import load_teacher
    from flashdistill.models.pipelines import PipelineVAE

    data = _image_folder(tmp_path / "data")
    teacher = load_teacher(teachers["sd"])
    ds = load_image_dataset(data, teacher.meta["image_size"])
    root = build_cache(ds, teacher, tmp_path / "c", str(data), shard_size=1, progress=False)
    first = {p.name: p.read_bytes() for p in root.iterdir()}
    for ext in ("safetensors", "json"):
        (root / f"shard-00001.{ext}").unlink()  # an interrupted build: shard 1 never written
    with pytest.raises(ValueError, match="incomplete"):
        CachedLatents(root)
    calls = []
    real = PipelineVAE.moments
    monkeypatch.setattr(PipelineVAE, "moments", lambda self, x: (calls.append(len(x)), real(self, x))[1])
    build_cache(ds, teacher, root, str(data), shard_size=1, progress=False)
    assert calls == [1]  # only the missing shard was encoded
    assert {p.name: p.read_bytes() for p in root.iterdir()} == first
    items = CachedLatents(root)
    assert len(items) == 3 and items[2]["prompt"] == "a dog"
    assert items[1]["latent_mean"].shape == tuple(teacher.image_shape)
    assert set(items[0]["text"]) == {"encoder_hidden_states"}
    small = load_image_dataset(data, teacher.meta["image_size"] // 2)
    with pytest.raises(CacheMismatch, match="resolution"):
        build_cache(small, teacher, root, str(data), shard_size=1, progress=False)


def test_cache_latents_needs_data(teachers, tmp_path, capsys):
    from flashdistill.cli import main

    assert main(["distill", "--teacher", str(teachers["sd"]), "--out", str(tmp_path / "r"),
                 "--cache-latents", str(tmp_path / "c")]) == 2
    assert "pass --data PATH" in capsys.readouterr().err


# --- conditional pipelines (issue 13): StableDiffusionInpaintPipeline, StableDiffusionAdapterPipeline --
CONDITIONAL = {"sd-inpaint": ("StableDiffusionInpaintPipeline", "inpaint"),
               "sd-upscale": ("StableDiffusionUpscalePipeline", "sr"),
               "sd-adapter": ("StableDiffusionAdapterPipeline", "sketch"),
               "sdxl-adapter": ("StableDiffusionXLAdapterPipeline", "sketch"),
               "sd-controlnet": ("StableDiffusionControlNetPipeline", "sketch"),
               "sdxl-controlnet": ("StableDiffusionXLControlNetPipeline", "sketch")}


@pytest.fixture(scope="module")
def conditional_teachers(tmp_path_factory):
    root = tmp_path_factory.mktemp("conditional")
    return {f: tp.build(f, root / f) for f in CONDITIONAL}


def _condition(task, n=2, rgb=False):
    """Our condition and the stock pipeline's keyword arguments for the same input (``rgb``: the
    1-channel sketch as the RGB image an RGB ControlNet takes)."""
    g = torch.Generator().manual_seed(3)
    image = torch.rand(n, 3, tp.IMAGE_SIZE, tp.IMAGE_SIZE, generator=g) * 2 - 1
    mask = torch.zeros(n, 1, tp.IMAGE_SIZE, tp.IMAGE_SIZE)
    mask[0, :, 4:12, 2:10] = 1
    mask[1:, :, 8:, :] = 1
    if task == "inpaint":
        return {"image": image, "mask": mask}, {"image": (image + 1) / 2, "mask_image": mask}
    if task == "sr":  # the upscaler's low-res input is at the latents' size, noised at noise_level
        low = image[:, :, ::2, ::2]
        return ({"low_res": low, "noise_level": torch.full((n,), 20)}, {"image": (low + 1) / 2, "noise_level": 20})
    return {"sketch": mask}, {"image": mask.expand(-1, 3, -1, -1) if rgb else mask}


def _stock(path, family):
    import diffusers

    extra = {} if family.startswith("sdxl") else {"safety_checker": None, "requires_safety_checker": False}
    return getattr(diffusers, CONDITIONAL[family][0]).from_pretrained(str(path), **extra)


@pytest.mark.parametrize("family", CONDITIONAL)
def test_conditional_pipeline_teacher_matches_the_stock_pipeline_with_cfg(conditional_teachers, family):
    """The call contracts: inpaint's 9-channel UNet gets [x_t, mask, masked-image latents] (the VAE
    draw from the pipeline's generator), the adapter pipeline's UNet the adapter's features (cloned
    per call), identical in both CFG branches: our DDIM + CFG equals the stock pipeline."""
    import diffusers

    from flashdistill.core.solvers import cfg_model, ddim
    from flashdistill.models.loading import load_model
    from flashdistill.sample import teacher_timesteps

    task = CONDITIONAL[family][1]
    model = load_model(conditional_teachers[family])
    assert model.task.name == task and model.image_shape == (4, 8, 8) and model.pixel_shape == (3, 16, 16)
    pipe = _stock(conditional_teachers[family], family)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config, timestep_spacing="trailing",
                                                         set_alpha_to_one=True, clip_sample=False)
    (cond, inputs), prompts, w, lat = _condition(task, rgb="controlnet" in family), ["a cat", "a red car"], 3.0, _noise(model, 2, 0)
    ref = pipe(prompts, **inputs, num_inference_steps=4, guidance_scale=w, latents=lat.clone(),
               generator=torch.Generator().manual_seed(7), output_type="latent").images
    spatial = model.spatial(cond, 2, torch.Generator().manual_seed(7))
    if task == "inpaint":
        assert spatial["concat"].shape == (2, 5, 8, 8)
    elif task == "sr":  # [x_t, noised low-res RGB]; the noise level as the class label
        assert spatial["concat"].shape == (2, 3, 8, 8) and spatial["class_labels"].tolist() == [20, 20]
    elif "controlnet" in family:  # the condition image; the ControlNet runs inside every backbone call
        assert spatial["controlnet_cond"].shape == (2, 1, 16, 16)
    else:
        assert [f.shape for f in spatial["down_intrablock_additional_residuals"]] == [(2, 16, 8, 8), (2, 32, 4, 4)]
    with torch.no_grad():
        ours = ddim(cfg_model(model.denoiser, model.cond(prompts, spatial), model.uncond(2, spatial), w), lat,
                    teacher_timesteps(model.schedule, 4), model.schedule)
        other = model.spatial({k: v.flip(0) for k, v in cond.items()}, 2, torch.Generator().manual_seed(7))
        swapped = ddim(cfg_model(model.denoiser, model.cond(prompts, other), model.uncond(2, other), w), lat,
                       teacher_timesteps(model.schedule, 4), model.schedule)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())
    assert (swapped - ours).abs().max() > 1e-3  # the condition steers the teacher


@pytest.mark.parametrize("family", CONDITIONAL)
def test_conditional_pipeline_flash_export_round_trip(conditional_teachers, family, tmp_path):
    """Flash on the pipeline (conditions made from each batch's images), then the exported LoRA in
    the stock pipeline with the exported LCMScheduler reproduces our sampler at 1, 2 and 4 steps."""
    import diffusers

    import flashdistill as fd
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps

    pipe_name, task = CONDITIONAL[family]
    teacher = conditional_teachers[family]
    data = _image_folder(tmp_path / "data")
    run = fd.distill(teacher, tmp_path / "run", data=data, lr=1e-2, progress=False,
                     overrides={"K": 8, "phase_steps": [1, 1, 1], "train": {"steps": 3, "batch_size": 2,
                                                                           "checkpoint_every": 3}})
    student = load_model(run)
    assert student.task.name == task and student.meta["pipeline"] == pipe_name
    (cond, inputs), prompts = _condition(task, rgb="controlnet" in family), ["a cat", "a red car"]
    images = fd.load(run).generate_tensor(prompts, 2, seed=1, condition=cond)
    assert images.shape == (2, 3, tp.IMAGE_SIZE, tp.IMAGE_SIZE) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="--cache-latents keeps latents, not images"):
        fd.distill(teacher, tmp_path / "cached", data=data, cache_latents=tmp_path / "cache", progress=False)

    out = fd.export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert pipe_name in card
    pipe = _stock(teacher, family)
    if pipe_name == "StableDiffusionAdapterPipeline":  # no LoRA loader mixin: the UNet's own loader
        pipe.unet.load_lora_adapter(str(out), weight_name="pytorch_lora_weights.safetensors", prefix="unet")
    else:
        pipe.load_lora_weights(out)
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(out, subfolder="scheduler")
    if task == "sr":  # the upscale pipeline takes no timesteps=: the scheduler's own picks must be the student's
        assert "takes no `timesteps=`" in card and "student's own timesteps at 1, 2 and 4 steps." in card
        assert "timesteps=" not in card.split("```python")[1]
        assert fd.load(run).pipeline_kwargs(2) == {"num_inference_steps": 2, "guidance_scale": 1.0}
        with pytest.raises(ValueError, match="takes no timesteps=, so the stock pipeline cannot sample at the chosen"):
            fd.load(run, timesteps=[999, 400]).pipeline_kwargs(2)  # chosen timesteps it could not honour
    for n in (1, 2, 4):
        ts = student_timesteps(student.sampling, n)
        lat = _noise(student, 2, 5)
        given = {} if task == "sr" else {"timesteps": ts.long().tolist()}
        ref = pipe(prompts, **inputs, num_inference_steps=n, **given, guidance_scale=1.0,
                   latents=lat.clone(), generator=torch.Generator().manual_seed(7), output_type="latent").images
        g = torch.Generator().manual_seed(7)  # inpaint: the masked image's latent first, sr: the low-res noise; then the re-noising
        spatial = student.spatial(cond, 2, g)
        noises = [torch.randn(lat.shape, generator=g) for _ in range(n)]
        with torch.no_grad():
            ours = lcm_multistep(student.denoiser, lat, ts, student.cond(prompts, spatial), student.schedule, noises)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)
    if task != "inpaint":
        return
    from PIL import Image

    from flashdistill.cli import main

    Image.new("RGB", (40, 40), (200, 30, 60)).save(tmp_path / "photo.png")
    box = Image.new("L", (40, 40), 0)
    box.paste(255, (10, 10, 30, 30))
    box.save(tmp_path / "mask.png")
    assert main(["sample", "--model", str(run), "--prompt", "a cat", "--steps", "2", "--num-images", "2", "--image",
                 str(tmp_path / "photo.png"), "--mask", str(tmp_path / "mask.png"), "--out", str(tmp_path / "g.png")]) == 0
    grid = Image.open(tmp_path / "g.png")
    assert grid.mode == "RGB" and grid.size[0] >= 3 * tp.IMAGE_SIZE  # the condition, then two samples


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_codi_on_a_pipeline_teacher_exports_a_controlnet_pipeline(teachers, family, tmp_path):
    """CoDi from a text-to-image pipeline: the condition image at the pixels' size, brought to the
    latents by the ControlNet's own stride-2 embedding; the export (LoRA + controlnet/) in the
    family's stock ControlNet pipeline reproduces the toolkit's samples."""
    import diffusers

    import flashdistill as fd
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import lcm_multistep, student_timesteps

    teacher = teachers[family]
    data = _image_folder(tmp_path / "data")
    with pytest.raises(ValueError, match="this sketch run makes its condition"):
        fd.distill(teacher, tmp_path / "cached", method="codi", data=data, cache_latents=tmp_path / "cache",
                   overrides={"task": "sketch"}, progress=False)
    run = fd.distill(teacher, tmp_path / "run", method="codi", data=data, lr=2e-2, progress=False,
                     overrides={"task": "sketch", "N": 8, "train": {"steps": 3, "batch_size": 2, "checkpoint_every": 3}})
    student = load_model(run)
    pipe_name = {"sd": "StableDiffusionControlNetPipeline", "sdxl": "StableDiffusionXLControlNetPipeline"}[family]
    assert student.task.name == "sketch" and student.meta["pipeline"] == pipe_name
    controlnet = student.denoiser.backbone.controlnet
    assert controlnet.config.conditioning_embedding_out_channels == [16, 32]  # 16 px -> 8x8 latents: one stride 2
    (cond, inputs), prompts = _condition("sketch"), ["a cat", "a red car"]
    loaded = fd.load(run)
    images = loaded.generate_tensor(prompts, 2, seed=1, condition=cond)
    assert images.shape == (2, 3, tp.IMAGE_SIZE, tp.IMAGE_SIZE) and torch.isfinite(images).all()
    # the trained ControlNet steers: another sketch, another sample
    other = loaded.generate_tensor(prompts, 2, seed=1, condition={"sketch": 1 - cond["sketch"]})
    assert (other - images).abs().max() > 1e-3  # float noise is ~1e-6

    out = fd.export(run, tmp_path / "export")
    card = (out / "README.md").read_text()
    assert f"{pipe_name}.from_pretrained(\"TEACHER_DIR\", controlnet=controlnet)" in card
    pipe = getattr(diffusers, pipe_name).from_pretrained(
        str(teacher), controlnet=diffusers.ControlNetModel.from_pretrained(out, subfolder="controlnet"),
        **({} if family == "sdxl" else {"safety_checker": None, "requires_safety_checker": False}))
    pipe.load_lora_weights(out)
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"]
    pipe.scheduler = getattr(diffusers, sched).from_pretrained(out, subfolder="scheduler")
    gamma = student.sampling.get("gamma", 1.0)
    eta = {"eta": gamma} if sched == "TCDScheduler" else {}
    built = loaded.pipeline()  # the same ControlNet pipeline built in memory from the run
    assert type(built).__name__ == pipe_name
    for n in (1, 2, 4):
        ts = student_timesteps(student.sampling, n)
        lat = _noise(student, 2, 5)
        ref = pipe(prompts, **inputs, num_inference_steps=n, timesteps=ts.long().tolist(), guidance_scale=1.0, **eta,
                   latents=lat.clone(), generator=torch.Generator().manual_seed(7), output_type="latent").images
        g = torch.Generator().manual_seed(7)
        spatial = student.spatial(cond, 2, g)
        noises = [torch.randn(lat.shape, generator=g) for _ in range(n)]
        with torch.no_grad():
            ours = lcm_multistep(student.denoiser, lat, ts, student.cond(prompts, spatial), student.schedule, noises,
                                 gamma=gamma)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)
        same = built(prompts, **inputs, **loaded.pipeline_kwargs(n), **eta, latents=lat.clone(),
                     generator=torch.Generator().manual_seed(7), output_type="latent").images
        torch.testing.assert_close(same, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)


def test_upscaler_with_another_low_res_schedule_is_refused(tmp_path):
    """The upscaler's low-res noise is ours only for the released low_res_scheduler; another one is
    refused at load rather than noised differently from the stock pipeline. And the ControlNet
    embedding CoDi builds downsamples by powers of two only."""
    from flashdistill.models.controlled import controlnet_for
    from flashdistill.models.loading import load_model

    path = tp.build("sd-upscale", tmp_path / "up")
    config = path / "low_res_scheduler" / "scheduler_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "beta_end": 0.03}))
    with pytest.raises(ValueError, match=r"low_res_scheduler differs .*'beta_end': \(0.03, 0.02\)"):
        load_model(path)
    with pytest.raises(ValueError, match="downsamples by 1, 2, 4 or 8, not 3"):
        controlnet_for(tp.unet(32), 1, 3)


def test_upscaler_samples_at_the_stock_pipelines_noise_level_by_default(tmp_path, monkeypatch):
    """An upscale pipeline's condition defaults to StableDiffusionUpscalePipeline's own noise_level
    (20), as its model card's example call, and so does its real-model evaluation; an explicit level
    is kept, one over the pipeline's max_noise_level is refused."""
    from PIL import Image

    import flashdistill as fd

    model = fd.load(tp.build("sd-upscale", tmp_path / "up"))
    low = Image.new("RGB", (8, 8), (200, 30, 30))
    assert model.condition(image=low, n=2)["noise_level"].tolist() == [20, 20]
    assert model.condition(image=low, noise_level=0)["noise_level"].tolist() == [0]
    with pytest.raises(ValueError, match=r"noise_level must be in \[0, 350\], got 351"):
        model.condition(image=low, noise_level=351)
    # real-model evaluation conditions its samples at the same level
    import flashdistill.sample as sampling
    from flashdistill.metrics import evaluate_real

    seen, real = [], sampling.sample

    def spy(*args, condition=None, **kwargs):
        seen.append(condition)
        return real(*args, condition=condition, **kwargs)

    monkeypatch.setattr(sampling, "sample", spy)
    low.save(tmp_path / "low.png")
    rows = evaluate_real(model.model, ["a cat", "a dog"], [1], guidance=2.0, progress=False,
                         condition_files=[tmp_path / "low.png"])
    assert seen[0]["noise_level"].tolist() == [20, 20] and rows[0]["task"] == "sr"


def test_controlnet_teachers_discriminator_features_see_the_controlnets_condition():
    """The encoder features of a ControlNet-steered backbone are what diffusers' UNet hands its
    decoder: the mid block's output plus the ControlNet's mid residual (not the bare mid block,
    which no ControlNet residual reaches), so they change with the condition image."""
    from flashdistill.core.schedules import VPSchedule
    from flashdistill.models.controlled import ControlledUNet, controlnet_for
    from flashdistill.models.denoiser import Denoiser

    torch.manual_seed(0)
    unet = tp.unet(32)
    controlnet = controlnet_for(unet, 1, 1)
    with torch.no_grad():  # past the zero initialisation: a ControlNet that steers
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = Denoiser(ControlledUNet(unet, controlnet), VPSchedule())
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([300.0, 700.0])
    text = torch.randn(2, 5, 32)
    sketches = [torch.rand(2, 1, 8, 8).round(), torch.rand(2, 1, 8, 8).round()]
    with torch.no_grad():
        feats = [d.encoder_features(x, t, {"encoder_hidden_states": text, "controlnet_cond": c}) for c in sketches]
        for c, f in zip(sketches, feats):
            _, mid = controlnet(x, t, encoder_hidden_states=text, controlnet_cond=c, return_dict=False)
            seen = []
            handle = unet.mid_block.register_forward_hook(lambda _m, _i, out: seen.append(out))
            unet(x, t, encoder_hidden_states=text)  # the bare mid block does not depend on the condition
            handle.remove()
            torch.testing.assert_close(f, seen[0] + mid)
    assert not torch.allclose(feats[0], feats[1])
    # a plain UNet's features are its mid block's output, as before
    plain = Denoiser(unet, VPSchedule()).encoder_features(x, t, {"encoder_hidden_states": text})
    torch.testing.assert_close(plain, seen[0])


def test_lightning_discriminator_on_a_controlnet_teacher_copies_no_decoder():
    """Lightning's discriminator copies a ControlNet teacher's encoder: the ControlNet and the UNet's
    down and mid blocks, not its up path (which it never runs: dead trainable weights, and unused
    parameters under DDP); its logits follow the condition image."""
    from flashdistill.core.schedules import VPSchedule
    from flashdistill.methods.lightning import LightningDiscriminator
    from flashdistill.models.controlled import ControlledUNet, controlnet_for

    torch.manual_seed(0)
    unet = tp.unet(32)
    controlnet = controlnet_for(unet, 1, 1)
    with torch.no_grad():
        for p in controlnet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher = ControlledUNet(unet, controlnet)
    cond = {"encoder_hidden_states": torch.randn(2, 5, 32), "controlnet_cond": torch.rand(2, 1, 8, 8).round()}
    disc = LightningDiscriminator(teacher, VPSchedule(), {k: v[:1] for k, v in cond.items()}, (4, 8, 8))
    names = [n for n, _ in disc.named_parameters()]
    assert not any(".unet.up_blocks." in n or ".unet.conv_out." in n for n in names)
    assert any(".unet.down_blocks." in n for n in names) and any(".unet.mid_block." in n for n in names)
    assert any(n.startswith("encoder.backbone.controlnet.") for n in names)
    assert len(teacher.unet.up_blocks) > 0  # the teacher keeps its decoder
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([250.0, 500.0])
    logits = disc(x, t, cond)
    other = disc(x, t, {**cond, "controlnet_cond": 1 - cond["controlnet_cond"]})
    assert logits.shape[0] == 2 and not torch.allclose(logits, other)
    logits.sum().backward()
    assert all(p.grad is not None for p in disc.parameters() if p.requires_grad)
    # a plain UNet's copy drops the same decoder half, and every copied weight trains
    plain = LightningDiscriminator(unet, VPSchedule(), {"encoder_hidden_states": cond["encoder_hidden_states"][:1]}, (4, 8, 8))
    plain_names = [n for n, _ in plain.named_parameters()]
    assert not any(".up_blocks." in n or ".conv_out." in n for n in plain_names)
    assert any(".mid_block." in n for n in plain_names) and len(unet.up_blocks) > 0
    plain(x, t, {"encoder_hidden_states": cond["encoder_hidden_states"]}).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in plain.parameters())
