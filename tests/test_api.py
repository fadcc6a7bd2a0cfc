"""The Python API (issue 15): the README's example runs as written, config keys map like --set, the
CLI gives the same results, ``pipeline()`` is the stock diffusers pipeline with the student fused,
kohya-format export round-trips, and trackers write what they say."""
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny_pipelines as tp

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = {"K": 8, "phase_steps": [1, 1, 1], "train": {"batch_size": 4, "checkpoint_every": 100, "log_every": 1}}


def readme_python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), re.S)


def test_readme_python_example_runs_as_written(tiny_teacher, tmp_path, monkeypatch):
    """The README's Python API block, verbatim, on a teacher at the path it names (here a tiny
    untrained one, so the run takes seconds)."""
    blocks = [b for b in readme_python_blocks() if "import flashdistill as fd" in b]
    assert blocks, "the README has no ```python block with the API example"
    code = blocks[0]
    teacher = re.search(r'teacher="([^"]+)"', code).group(1)
    shutil.copytree(tiny_teacher, tmp_path / teacher)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, str(README), "exec"), namespace)
    # what the example promises
    run, images, table = namespace["run"], namespace["images"], namespace["table"]
    assert (Path(run) / "student" / "student_lora.safetensors").is_file()
    assert images and images[0].size == (8, 8) and images[0].mode == "L"
    assert [r["steps"] for r in table] == [1, 2, 4] and all(0 <= r["adherence"] <= 1 for r in table)
    assert (tmp_path / "exported" / "pytorch_lora_weights.safetensors").is_file()


def test_keyword_config_keys_map_like_set_and_unknown_keys_are_named(tiny_teacher, tmp_path):
    import flashdistill as fd

    run = fd.distill(tiny_teacher, tmp_path / "r", steps=7, lr=1e-3, overrides={"train.seed": 3, "K": 8},
                     dry_run=True, progress=False)
    assert run.config["train"]["steps"] == 7 and run.config["lr"] == 1e-3
    assert run.config["train"]["seed"] == 3 and run.config["K"] == 8
    with pytest.raises(Exception, match="no_such_key"):
        fd.distill(tiny_teacher, tmp_path / "r", no_such_key=1, dry_run=True, progress=False)
    with pytest.raises(ValueError, match="report_to"):
        fd.distill(tiny_teacher, tmp_path / "r", report_to="mlflow", dry_run=True, progress=False)


def test_cli_and_api_give_the_same_student(tiny_teacher, tmp_path, capsys):
    import flashdistill as fd
    from flashdistill.cli import main

    sets = ["K=8", "phase_steps=[1,1,1]", "train.batch_size=4", "train.steps=3", "train.checkpoint_every=100"]
    assert main(["distill", "--teacher", str(tiny_teacher), "--out", str(tmp_path / "cli"), "--quiet",
                 *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert f"student written to {tmp_path / 'cli'}" in out
    run = fd.distill(tiny_teacher, tmp_path / "api", overrides=FAST, steps=3, progress=False)
    assert run.seconds is not None and Path(run) == tmp_path / "api"
    a = fd.load(tmp_path / "cli").generate_tensor(["a handwritten digit one"] * 3, steps=2, seed=5)
    b = fd.load(run).generate_tensor(["a handwritten digit one"] * 3, steps=2, seed=5)
    assert torch.equal(a, b)
    # generate() gives what `flashdistill sample --npz` writes, image for image
    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(run), "--prompt", "a handwritten digit one", "--steps", "2", "--seed", "5",
                 "--num-images", "3", "--out", str(tmp_path / "s.png"), "--npz", str(npz)]) == 0
    ref = np.load(npz)["images"]
    pil = fd.load(run).generate(["a handwritten digit one"] * 3, steps=2, seed=5)
    want = np.round((ref.clip(-1, 1) + 1) * 127.5).astype(np.uint8)[:, 0]
    assert np.array_equal(np.stack([np.asarray(p) for p in pil]), want)


def test_teacher_and_student_loading_and_errors(tiny_teacher, tmp_path):
    import flashdistill as fd

    teacher = fd.load(tiny_teacher)
    assert not teacher.is_student and teacher.default_steps == 32 and teacher.step_counts == []
    (image,) = teacher.generate("a handwritten digit two", steps=2, seed=4)  # a string is one prompt
    x = teacher.generate_tensor(["a handwritten digit two"], steps=2, seed=4)[0, 0]
    assert np.array_equal(np.asarray(image), ((x.clamp(-1, 1) + 1) * 127.5).round().byte().numpy())
    with pytest.raises(ValueError, match="prompts is empty"):
        teacher.generate([])
    with pytest.raises(ValueError, match="not a diffusers pipeline"):
        teacher.pipeline()
    with pytest.raises(ValueError, match="format must be one of"):
        fd.export(tiny_teacher, tmp_path / "x", format="ckpt")


@pytest.fixture(scope="module")
def sd_run(tmp_path_factory):
    """A 2-step Flash LoRA run on the tiny SD1.5-style pipeline (alpha != rank, so the LoRA's scale
    must survive a kohya conversion)."""
    import flashdistill as fd

    root = tmp_path_factory.mktemp("sd_run")
    teacher = tp.build("sd", root / "teacher")
    g = torch.Generator().manual_seed(0)
    data = root / "data"
    data.mkdir()
    from PIL import Image

    lines = []
    for i, prompt in enumerate(["a cat", "a red car", "a dog", "a lake"]):
        arr = (torch.rand(tp.IMAGE_SIZE, tp.IMAGE_SIZE, 3, generator=g) * 255).byte().numpy()
        Image.fromarray(arr).save(data / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": prompt}))
    (data / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    run = fd.distill(teacher, root / "run", data=data, lora_rank=2, lora_alpha=4.0, lr=1e-2,
                     overrides={"K": 8, "phase_steps": [1, 1, 1], "train": {"steps": 3, "batch_size": 2,
                                                                           "checkpoint_every": 3}}, progress=False)
    return teacher, run


def test_pipeline_is_the_stock_diffusers_pipeline_with_the_student_fused(sd_run):
    import diffusers

    import flashdistill as fd

    _, run = sd_run
    student = fd.load(run)
    pipe = student.pipeline()
    assert isinstance(pipe, diffusers.StableDiffusionPipeline) and isinstance(pipe.scheduler, diffusers.LCMScheduler)
    ours = student.generate_tensor(["a cat", "a dog"], steps=1, seed=3)
    from flashdistill.sample import seeded_noise

    latents = seeded_noise(student.model.image_shape, [3, 4])
    ref = pipe(["a cat", "a dog"], latents=latents, output_type="pt", **student.pipeline_kwargs(1)).images
    torch.testing.assert_close(ref * 2 - 1, ours.clamp(-1, 1), rtol=1e-4, atol=1e-4)
    # a timestep of the user's choosing (--timesteps) reaches the stock pipeline's call too (one
    # step: the pipeline's re-noising draws its own noise)
    chosen = fd.load(run, timesteps=[899])
    assert chosen.pipeline_kwargs(1)["timesteps"] == [899]
    ours = chosen.generate_tensor(["a cat", "a dog"], steps=1, seed=3)
    ref = pipe(["a cat", "a dog"], latents=latents, output_type="pt", **chosen.pipeline_kwargs(1)).images
    torch.testing.assert_close(ref * 2 - 1, ours.clamp(-1, 1), rtol=1e-4, atol=1e-4)


def test_extra_lora_interval_is_the_stock_pipeline_with_set_adapters_per_step(sd_run, tmp_path):
    """The diffusers recipe of --extra-lora-interval (docs/guide.md): in the stock pipeline with the
    exported student LoRA and an extra LoRA as two adapters, the extra one's set_adapters weight set
    before each step (0 outside [lo, hi], its scale inside, by a callback_on_step_end) gives the
    toolkit's 2-step sample with that LoRA limited to [lo, hi]. The extra LoRA here is the student's
    own export at scale 0.5, on the second call only."""
    import diffusers

    import flashdistill as fd
    from flashdistill.models.student import lcm_multistep, student_timesteps

    teacher, run = sd_run
    export = fd.export(run, tmp_path / "export", num_samples=0)
    lora = export / "pytorch_lora_weights.safetensors"
    ours = fd.load(run, extra_loras=[(lora, 0.5, (0, 600))]).model
    ts = student_timesteps(ours.sampling, 2)
    assert float(ts[0]) > 600 >= float(ts[1])  # the first call outside the interval, the second inside
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(teacher), safety_checker=None,
                                                             requires_safety_checker=False)
    pipe.load_lora_weights(str(export), adapter_name="flash")
    pipe.load_lora_weights(str(export), adapter_name="extra")
    pipe.scheduler = diffusers.LCMScheduler.from_pretrained(export, subfolder="scheduler")

    def weight(t):
        return 0.5 if 0 <= float(t) <= 600 else 0.0

    def per_step(pipe, i, t, callback_kwargs):
        if i + 1 < len(pipe.scheduler.timesteps):
            pipe.set_adapters(["flash", "extra"], [1.0, weight(pipe.scheduler.timesteps[i + 1])])
        return callback_kwargs

    prompts = ["a cat", "a dog"]
    lat = torch.randn(2, *ours.image_shape, generator=torch.Generator().manual_seed(5))
    pipe.set_adapters(["flash", "extra"], [1.0, weight(ts[0])])
    ref = pipe(prompts, num_inference_steps=2, timesteps=ts.long().tolist(), guidance_scale=1.0, latents=lat.clone(),
               generator=torch.Generator().manual_seed(7), output_type="latent", callback_on_step_end=per_step).images
    gen = torch.Generator().manual_seed(7)
    noises = [torch.randn(lat.shape, generator=gen) for _ in range(2)]
    with torch.no_grad():
        mine = lcm_multistep(ours.denoiser, lat, ts, ours.cond(prompts), ours.schedule, noises)
        everywhere = fd.load(run, extra_loras=[(lora, 0.5)]).model
        whole = lcm_multistep(everywhere.denoiser, lat, ts, everywhere.cond(prompts), everywhere.schedule, noises)
    torch.testing.assert_close(mine, ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item() + 1e-6)
    assert (mine - whole).abs().max() > 1e-4  # the first call made a difference


def test_kohya_export_round_trips_to_the_same_weights(sd_run, tmp_path, capsys):
    import diffusers
    from diffusers.utils import convert_unet_state_dict_to_peft
    from safetensors.torch import load_file

    from flashdistill.cli import main
    from flashdistill.models.loading import load_model

    teacher, run = sd_run
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "k"), "--format", "kohya"]) == 0
    files = list((tmp_path / "k").glob("*.safetensors"))
    assert len(files) == 1 and (tmp_path / "k" / "README.md").is_file()
    kohya = load_file(str(files[0]))
    assert all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {4.0}
    own = load_file(str(Path(run) / "student" / "student_lora.safetensors"))
    downs = {k: v for k, v in kohya.items() if k.endswith("lora_down.weight")}
    assert len(downs) == sum(k.endswith("lora_A.weight") for k in own)
    # back through diffusers' own kohya reader: the same matrices, module for module, and alpha
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(files[0]))
    back = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in state.items()})
    assert back.keys() == own.keys()
    assert all(torch.equal(back[k], own[k]) for k in own)
    assert set(alphas.values()) == {4.0} and len(alphas) == len(downs)
    # and loaded into the stock pipeline, fused: the same UNet as our fused student
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(teacher), safety_checker=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(files[0]))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # the fused weights stay, the LoRA layers go
    fused = load_model(run).denoiser.backbone.state_dict()
    theirs = pipe.unet.state_dict()
    for k, v in fused.items():
        torch.testing.assert_close(theirs[k], v, rtol=1e-5, atol=1e-6)
    assert any(not torch.equal(v, w) for v, w in zip(fused.values(), load_model(teacher).denoiser.backbone.state_dict().values()))


def test_a_kohya_lora_stacks_on_the_sd_teacher_as_the_student_it_came_from(sd_run, tmp_path):
    """--extra-lora takes LoRA files from other tools (kohya naming, read by diffusers' loader):
    the teacher with the student's kohya export stacked is the fused student."""
    from flashdistill.cli import main
    from flashdistill.models.loading import load_model

    teacher, run = sd_run
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "k"), "--format", "kohya"]) == 0
    kohya = next((tmp_path / "k").glob("*.safetensors"))
    stacked = load_model(teacher, extra_loras=[(kohya, 1.0)])
    assert stacked.meta["extra_loras"] == [{"path": str(kohya), "scale": 1.0}] and "style" not in stacked.meta
    fused = load_model(run).denoiser.backbone.state_dict()
    mine = stacked.denoiser.backbone.state_dict()
    assert mine.keys() == fused.keys()
    for k, v in fused.items():
        torch.testing.assert_close(mine[k], v, rtol=1e-5, atol=1e-6)


def test_kohya_export_refuses_what_those_tools_cannot_load(tiny_teacher, tmp_path):
    import flashdistill as fd

    run = fd.distill(tiny_teacher, tmp_path / "r", overrides=FAST, steps=1, progress=False)
    with pytest.raises(ValueError, match="digits teacher .* no counterpart.*--format diffusers"):
        fd.export(run, tmp_path / "k", format="kohya")


def test_tensorboard_tracker_logs_losses_lr_and_previews(tiny_teacher, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    import flashdistill as fd

    run = fd.distill(tiny_teacher, tmp_path / "r", overrides={**FAST, "train": {**FAST["train"], "sample_every": 2}},
                     steps=4, progress=False, report_to="tensorboard")
    events = list((Path(run) / "tensorboard").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent), size_guidance={"images": 0, "scalars": 0})
    acc.Reload()
    tags = acc.Tags()
    assert {"loss", "distill", "lr/student"} <= set(tags["scalars"])
    logged = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in logged])
    assert [e.step for e in acc.Scalars("loss")] == [r["step"] for r in logged]
    assert "preview" in tags["images"] and [e.step for e in acc.Images("preview")] == [2, 4, 4]


def test_wandb_offline_mode_logs_without_a_network(tiny_teacher, tmp_path, monkeypatch):
    import flashdistill as fd

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run = fd.distill(tiny_teacher, tmp_path / "r", overrides=FAST, steps=2, progress=False, report_to="wandb")
    offline = list((Path(run) / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("*.wandb"))


def test_students_sample_and_evaluate_at_chosen_timesteps(tiny_teacher, tmp_path, capsys):
    """--timesteps / timesteps=: the student samples exactly as a run whose own table held them, at
    that step count only; the rows say where they sampled; bad input is refused, naming it."""
    import flashdistill as fd
    from flashdistill.cli import main

    run = fd.distill(tiny_teacher, tmp_path / "run", overrides=FAST, steps=2, progress=False)
    prompts, chosen = ["a handwritten digit one"] * 2, [999, 500, 100]
    edited = tmp_path / "edited"  # the same run with the chosen timesteps written into its table
    shutil.copytree(run, edited)
    meta = json.loads((edited / "flashdistill.json").read_text())
    meta["sampling"]["timesteps"]["3"] = chosen
    (edited / "flashdistill.json").write_text(json.dumps(meta))
    want = fd.load(edited).generate_tensor(prompts, steps=3, seed=2)
    student = fd.load(run, timesteps=chosen)
    assert student.step_counts == [1, 2, 3, 4]
    assert torch.equal(student.generate_tensor(prompts, steps=3, seed=2), want)
    assert torch.equal(student.generate_tensor(prompts, steps=2, seed=2),  # other step counts keep their own
                       fd.load(run).generate_tensor(prompts, steps=2, seed=2))
    assert student.pipeline_kwargs(3)["timesteps"] == chosen

    npz = tmp_path / "s.npz"
    assert main(["sample", "--model", str(run), "--prompt", prompts[0], "--timesteps", "999", "500", "100",
                 "--seed", "2", "--num-images", "2", "--out", str(tmp_path / "s.png"), "--npz", str(npz)]) == 0
    assert np.array_equal(np.load(npz)["images"], want.clamp(-1, 1).numpy())  # (the npz is clamped)
    assert main(["evaluate", "--model", str(run), "--timesteps", "999", "500", "100", "--num-samples", "10",
                 "--quiet", "--out", str(tmp_path / "e.json")]) == 0
    assert "student sampled at 999 500 100 (3 steps, --timesteps)" in capsys.readouterr().out
    rows = json.loads((tmp_path / "e.json").read_text())["rows"]
    assert [(r["steps"], r["timesteps"]) for r in rows] == [(3, chosen)]  # no --steps: the length of --timesteps
    rows = fd.evaluate(run, num_samples=10)  # no steps: the student's own counts, each with its table
    assert [r["steps"] for r in rows] == [1, 2, 4] and rows[0]["timesteps"] == meta["sampling"]["timesteps"]["1"]
    # several tables, one per step count (--timesteps repeated)
    rows = fd.evaluate(run, num_samples=10, timesteps=[chosen, [999, 300]])
    assert [(r["steps"], r["timesteps"]) for r in rows] == [(2, [999, 300]), (3, chosen)]
    assert fd.load(run, timesteps={3: chosen, 2: [999, 300]}).model.sampling == fd.load(
        run, timesteps=[chosen, [999, 300]]).model.sampling
    with pytest.raises(ValueError, match=r"each step count needs that many timesteps, got \{4: \[999, 300\]\}"):
        fd.load(run, timesteps={4: [999, 300]})
    # export --timesteps: the files carry the chosen tables and say they were chosen at export
    assert main(["export", "--model", str(run), "--out", str(tmp_path / "exp"), "--num-samples", "10", "--quiet",
                 "--timesteps", "999", "500", "100", "--timesteps", "999", "300"]) == 0
    written = json.loads((tmp_path / "exp" / "flashdistill_sampling.json").read_text())
    assert written["timesteps"]["3"] == chosen and written["timesteps"]["2"] == [999, 300]
    assert written["chosen_at_export"] == ["2", "3"] and list(written["timesteps"]) == ["1", "2", "3", "4"]
    own = json.loads((run.path / "flashdistill.json").read_text())["sampling"]["timesteps"]
    assert {k: v for k, v in written["timesteps"].items() if k not in ("2", "3")} == {k: own[k] for k in ("1", "4")}
    card = (tmp_path / "exp" / "README.md").read_text()
    assert "chosen at export" in card and f"| 3 | `{chosen}` |" in card and "| 3 | 3 |" in card  # table and metrics
    with pytest.raises(ValueError, match="ComfyUI / A1111 / Forge take a step count, not timesteps"):
        fd.export(run, tmp_path / "k", format="kohya", timesteps=chosen)

    for argv, needle in [
        (["sample", "--model", str(run), "--steps", "2", "--timesteps", "999", "500", "100"],
         "--timesteps gives tables of 3 step(s) (999 500 100), but --steps is 2"),
        (["sample", "--model", str(run), "--timesteps", "999", "500", "100", "--timesteps", "999", "300"],
         "--timesteps gives tables of 3, 2 step(s) (999 500 100; 999 300), but --steps is None: pass --steps"),
        (["evaluate", "--model", str(run), "--timesteps", "999", "500", "--timesteps", "999", "300"],
         "--timesteps: two tables of 2 timesteps ([[999, 500], [999, 300]]); give one per step count"),
        (["evaluate", "--model", str(run), "--steps", "1", "2", "--timesteps", "999", "500", "100"],
         "--timesteps gives 3 timestep(s) (999 500 100), so 3 steps, but --steps is 1 2"),
        (["sample", "--model", str(run), "--timesteps", "100", "500"],
         "--timesteps must be integers from high to low in [0, 999], got [100, 500]"),
        (["sample", "--model", str(run), "--timesteps", "1000"],
         "--timesteps must be integers from high to low in [0, 999], got [1000]"),
        (["sample", "--model", str(tiny_teacher), "--timesteps", "999", "500"], "is a teacher"),
    ]:
        if argv[0] == "sample":
            argv = [*argv, "--prompt", prompts[0], "--out", str(tmp_path / "x.png")]
        assert main(argv) != 0
        err = capsys.readouterr().err
        assert needle in err and "Traceback" not in err, (argv, err)
