"""LoRA composition (issue 13, the paper's "existing LoRAs"): a style LoRA trained on the teacher
(``train-teacher --base --style thick --lora``), stacked on a distilled student at inference
(``--extra-lora``) with no training, equal to diffusers' own ``set_adapters`` of the two LoRAs."""
import json

import numpy as np
import pytest
import torch

FAST = {"K": 8, "phase_steps": [1, 1, 1], "train": {"batch_size": 4, "checkpoint_every": 100, "log_every": 1}}


def test_thicken_is_scipys_grey_dilation():
    from scipy import ndimage

    from flashdistill.styles import get_style, thicken

    x = torch.rand(5, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ref = ndimage.grey_dilation(x[:, 0].numpy(), size=(1, 1, 2))
    np.testing.assert_array_equal(thicken(x)[:, 0].numpy(), ref)
    assert get_style("none")(x) is x
    with pytest.raises(ValueError, match=r"unknown style 'bold'; expected one of \['none', 'thick'\]"):
        get_style("bold")


@pytest.fixture(scope="module")
def style_lora(tiny_teacher, tmp_path_factory):
    import flashdistill as fd

    out = tmp_path_factory.mktemp("style") / "thick"
    fd.train_teacher(out, base=str(tiny_teacher), style="thick", lora=True, lora_rank=2, steps=3,
                     overrides={"train.batch_size": 8, "lr": 5e-2}, progress=False)
    return out


@pytest.fixture(scope="module")
def flash_run(tiny_teacher, tmp_path_factory):
    import flashdistill as fd

    return fd.distill(tiny_teacher, tmp_path_factory.mktemp("flash") / "run", overrides=FAST, steps=2, lr=5e-2,
                      progress=False)


def test_style_lora_folder_trains_only_the_lora_and_loads_as_its_base_with_it(tiny_teacher, style_lora):
    from safetensors.torch import load_file

    from flashdistill.models.loading import load_model

    meta = json.loads((style_lora / "flashdistill.json").read_text())
    assert meta["kind"] == "lora" and meta["style"] == "thick" and meta["rank"] == 2 and meta["base"] == str(tiny_teacher)
    assert {"conv1", "conv2", "to_q"} <= set(meta["targets"])
    state = load_file(str(style_lora / "pytorch_lora_weights.safetensors"))
    assert state and all(k.startswith("unet.") and ".lora_" in k for k in state)
    assert any(v.abs().sum() > 0 for k, v in state.items() if "lora_B" in k)  # B starts at zero: it trained
    assert not (style_lora / "unet").exists()  # a LoRA, not a second teacher

    teacher, styled = load_model(tiny_teacher), load_model(style_lora)
    assert styled.meta["style"] == "thick" and styled.meta["extra_loras"][0]["scale"] == 1.0
    base = dict(teacher.denoiser.backbone.named_parameters())
    changed = [n for n, p in styled.denoiser.backbone.named_parameters() if not torch.equal(p, base[n])]
    assert changed and all(any(t in n for t in ("conv1", "conv2", "to_", "proj_", "ff.")) for n in changed)


def _two_adapter_unet(tiny_teacher, flash_run, style_lora, out, style_weight):
    """The teacher's stock diffusers UNet with the exported Flash LoRA and the style LoRA as two
    adapters, mixed at (1, style_weight) by set_adapters."""
    from diffusers import UNet2DConditionModel

    import flashdistill as fd

    export = fd.export(flash_run, out, num_samples=0)
    unet = UNet2DConditionModel.from_pretrained(tiny_teacher / "unet").eval()
    unet.load_lora_adapter(str(export / "pytorch_lora_weights.safetensors"), prefix="unet", adapter_name="flash")
    unet.load_lora_adapter(str(style_lora / "pytorch_lora_weights.safetensors"), prefix="unet", adapter_name="style")
    unet.set_adapters(["flash", "style"], weights=[1.0, style_weight])
    return unet


def _probe(model):
    """Noisy inputs at three timesteps, two prompts and the empty one, in the model's conditioning."""
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    return x, torch.tensor([999, 500, 20]), model.cond(["a handwritten digit one", "a handwritten digit two", ""])


def test_extra_lora_on_a_student_equals_diffusers_set_adapters(tiny_teacher, style_lora, flash_run, tmp_path):
    """The exported Flash LoRA and the style LoRA, loaded into the teacher's stock diffusers UNet as
    two adapters and mixed with set_adapters, give what the toolkit's fused student + extra LoRA
    gives."""
    from flashdistill.models.loading import load_model

    scale = 0.7
    ours = load_model(flash_run, extra_loras=[(style_lora, scale)])
    assert ours.meta["style"] == "thick" and ours.meta["kind"] == "student"
    unet = _two_adapter_unet(tiny_teacher, flash_run, style_lora, tmp_path / "export", scale)
    x, t, cond = _probe(ours)
    with torch.no_grad():
        theirs = unet(x, t, **cond).sample
        mine = ours.denoiser.backbone(x, t, **cond).sample
        plain = load_model(flash_run).denoiser.backbone(x, t, **cond).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert (mine - plain).abs().max() > 1e-3  # the style LoRA is there


def test_block_scales_equal_peft_per_layer_scales_in_diffusers(tiny_teacher, style_lora, flash_run, tmp_path):
    """Per-block scales (``{"mid": 0.5, "up.1": 0.3}``) scale every LoRA layer of those blocks,
    resnets included: the same as diffusers' UNet with both adapters and peft's own per-layer
    ``set_scale`` on those layers; the B tensors of other blocks are left as they were."""
    from diffusers import StableDiffusionPipeline
    from peft.tuners.lora import LoraLayer

    import flashdistill as fd
    from flashdistill.models.loading import load_model, scale_lora_blocks

    scales = {"mid": 0.5, "up.1": 0.3}
    ours = load_model(flash_run, extra_loras=[(style_lora, scales)])
    assert ours.meta["extra_loras"] == [{"path": str(style_lora), "scale": scales}]
    unet = _two_adapter_unet(tiny_teacher, flash_run, style_lora, tmp_path / "export", 1.0)
    scaled = 0
    for name, module in unet.named_modules():
        if isinstance(module, LoraLayer) and name.startswith(("mid_block.", "up_blocks.1.")):
            module.set_scale("style", 0.5 if name.startswith("mid_block.") else 0.3)
            scaled += 1
    assert scaled and any(".resnets." in n for n, m in unet.named_modules() if isinstance(m, LoraLayer) and "mid_block" in n)

    x, t, cond = _probe(ours)
    with torch.no_grad():
        theirs = unet(x, t, **cond).sample
        mine = ours.denoiser.backbone(x, t, **cond).sample
        whole = load_model(flash_run, extra_loras=[(style_lora, 1.0)]).denoiser.backbone(x, t, **cond).sample
    torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-5)
    assert (mine - whole).abs().max() > 1e-4  # the block scales changed something

    # the diffusers route the docs give: the scaled state dict loaded as any LoRA, at weight 1
    state = StableDiffusionPipeline.lora_state_dict(str(style_lora), weight_name="pytorch_lora_weights.safetensors")[0]
    unet.delete_adapters("style")
    unet.load_lora_adapter(fd.scale_lora_blocks(state, scales), prefix="unet", adapter_name="style")
    unet.set_adapters(["flash", "style"], weights=[1.0, 1.0])
    with torch.no_grad():
        torch.testing.assert_close(unet(x, t, **cond).sample, mine, rtol=1e-4, atol=1e-5)

    out = scale_lora_blocks(state, {"default": 2.0, "mid": 0.0})
    for k, v in state.items():
        want = v * 0.0 if "mid_block" in k and "lora_B" in k else v * 2.0 if "lora_B" in k else v
        torch.testing.assert_close(out[k], want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"LoRA block\(s\) \['down.7'\] hold no weights of this LoRA; its UNet blocks are \["):
        scale_lora_blocks(state, {"down.7": 0.5})
    with pytest.raises(ValueError, match=r"unknown LoRA block 'middle'; expected 'default', 'down', 'mid'"):
        load_model(flash_run, extra_loras=[(style_lora, {"middle": 0.5})])
    with pytest.raises(ValueError, match=r"a LoRA scale must be a number or a dict of block scales, not \{'mid': 0.5\}"):
        load_model(flash_run, extra_loras=[(style_lora, {"mid": {"mid": 0.5}})])


def test_extra_lora_limited_to_timesteps_switches_per_call_as_diffusers_set_adapters(tiny_teacher, style_lora,
                                                                                      flash_run, tmp_path):
    """A stacked LoRA with a timestep interval [lo, hi] applies at the calls whose timestep is
    inside it, at its scale, and not at the others: per call, diffusers' UNet with both adapters and
    the style's set_adapters weight set to the scale or to 0; a sample equals one whose calls switch
    between the fused styled student and the plain one by timestep. A call mixing timesteps on both
    sides is refused, and so are a bad interval and a second limited LoRA."""
    import flashdistill as fd
    from flashdistill.models.loading import load_model

    scale = 0.7
    ours = load_model(flash_run, extra_loras=[(style_lora, scale, (0, 600))])
    assert ours.meta["extra_loras"] == [{"path": str(style_lora), "scale": scale, "interval": [0.0, 600.0]}]
    unet = _two_adapter_unet(tiny_teacher, flash_run, style_lora, tmp_path / "export", scale)
    x, _, cond = _probe(ours)
    plain, fused = load_model(flash_run), load_model(flash_run, extra_loras=[(style_lora, scale)])
    with torch.no_grad():
        for t, weight, same_as in ((999, 0.0, plain), (600, scale, fused), (20, scale, fused), (601, 0.0, plain)):
            tt = torch.full((3,), t)
            unet.set_adapters(["flash", "style"], weights=[1.0, weight])
            mine = ours.denoiser.backbone(x, tt, **cond).sample
            torch.testing.assert_close(mine, unet(x, tt, **cond).sample, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(mine, same_as.denoiser.backbone(x, tt, **cond).sample, rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match=r"limited to timesteps \[0, 600\] needs one timestep per call"):
            ours.denoiser.backbone(x, torch.tensor([999, 500, 20]), **cond)

    # a 4-step sample with the style on every call but the first (t = 999)
    prompts = ["a handwritten digit two", "a handwritten digit eight"]
    got = fd.load(flash_run, extra_loras=[(style_lora, 1.0, (0, 998))]).generate_tensor(prompts, 4, seed=3)
    switching = load_model(flash_run, extra_loras=[(style_lora, 1.0)])  # the style fused; its first call is the plain student's
    styled_call, plain_call = switching.denoiser.backbone.forward, load_model(flash_run).denoiser.backbone
    switching.denoiser.backbone.forward = lambda x, timestep, **kw: (
        plain_call if float(timestep.flatten()[0]) >= 999 else styled_call)(x, timestep=timestep, **kw)
    want = fd.Loaded(switching).generate_tensor(prompts, 4, seed=3)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    everywhere = fd.load(flash_run, extra_loras=[(style_lora, 1.0)]).generate_tensor(prompts, 4, seed=3)
    assert (got - everywhere).abs().max() > 1e-3  # the first call made a difference

    with pytest.raises(ValueError, match=r"needs 0 <= lo <= hi, got \[600, 20\]"):
        load_model(flash_run, extra_loras=[(style_lora, 1.0, (600, 20))])
    with pytest.raises(ValueError, match="one extra LoRA per model can be limited to a timestep interval"):
        load_model(flash_run, extra_loras=[(style_lora, 1.0, (0, 998)), (style_lora, 0.5, (0, 500))])
    # a fused LoRA given after the limited one is stacked before it
    both = load_model(flash_run, extra_loras=[(style_lora, 1.0, (0, 998)), (style_lora, 0.5)])
    assert [e.get("interval") for e in both.meta["extra_loras"]] == [None, [0.0, 998.0]]


def test_extra_lora_from_the_cli_and_its_errors(tiny_teacher, style_lora, flash_run, tmp_path, capsys):
    from flashdistill.cli import main

    import flashdistill as fd

    out = tmp_path / "grid.png"
    for name, extra in (("styled", ["--extra-lora", str(style_lora), "--extra-lora-scale", "0.5"]), ("plain", [])):
        assert main(["sample", "--model", str(flash_run), "--prompt", "a handwritten digit two", "--steps", "2",
                     "--num-images", "2", "--out", str(out), "--npz", str(tmp_path / f"{name}.npz"), *extra]) == 0
    styled, plain = (np.load(tmp_path / f"{n}.npz")["images"] for n in ("styled", "plain"))
    want = fd.load(flash_run, extra_loras=[(style_lora, 0.5)]).generate_tensor(["a handwritten digit two"] * 2, 2)
    np.testing.assert_allclose(styled, want.clamp(-1, 1).numpy(), atol=1e-6)
    assert np.abs(styled - plain).max() > 1e-3
    def error(*extra):
        code = main(["sample", "--model", str(flash_run), "--prompt", "x", "--out", str(out), *extra])
        return code, capsys.readouterr().err

    blocks = tmp_path / "blocks.npz"
    assert main(["sample", "--model", str(flash_run), "--prompt", "a handwritten digit two", "--steps", "2",
                 "--num-images", "2", "--out", str(out), "--npz", str(blocks), "--extra-lora", str(style_lora),
                 "--extra-lora-scale", "0.5,mid=0"]) == 0
    want = fd.load(flash_run, extra_loras=[(style_lora, {"default": 0.5, "mid": 0.0})]).generate_tensor(
        ["a handwritten digit two"] * 2, 2)
    np.testing.assert_allclose(np.load(blocks)["images"], want.clamp(-1, 1).numpy(), atol=1e-6)
    limited = tmp_path / "limited.npz"
    assert main(["sample", "--model", str(flash_run), "--prompt", "a handwritten digit two", "--steps", "2",
                 "--num-images", "2", "--out", str(out), "--npz", str(limited), "--extra-lora", str(style_lora),
                 "--extra-lora-scale", "mid=0.5", "--extra-lora-interval", "0", "998"]) == 0
    want = fd.load(flash_run, extra_loras=[(style_lora, {"mid": 0.5}, (0, 998))]).generate_tensor(
        ["a handwritten digit two"] * 2, 2)
    np.testing.assert_allclose(np.load(limited)["images"], want.clamp(-1, 1).numpy(), atol=1e-6)
    assert np.abs(np.load(limited)["images"] - np.load(blocks)["images"]).max() > 1e-3
    code, err = error("--extra-lora", str(style_lora), "--extra-lora-interval", "998", "0")
    assert code == 2 and "--extra-lora-interval 998 0: expected LO <= HI" in err
    code, err = error("--extra-lora-interval", "0", "998")
    assert code == 2 and "limits an --extra-lora, and none is given" in err
    with pytest.raises(SystemExit) as exit_:
        error("--extra-lora", str(style_lora), "--extra-lora-scale", "mid=half")
    assert exit_.value.code == 2 and "got 'half' in 'mid=half'" in capsys.readouterr().err
    code, err = error("--extra-lora", str(style_lora), "--extra-lora-scale", "0.5", "--extra-lora-scale", "1")
    assert code == 2 and "2 --extra-lora-scale value(s) for 1 --extra-lora" in err
    code, err = error("--extra-lora", str(tmp_path / "missing"))
    assert code == 2 and f"LoRA {str(tmp_path / 'missing')!r} does not exist" in err
    code, err = error("--extra-lora", str(tiny_teacher))  # a teacher folder is not a LoRA
    assert code == 2 and "holds a 'teacher', not a LoRA" in err


def test_styled_rows_score_against_the_styled_test_split():
    from flashdistill.data.digits import load_digits
    from flashdistill.scoring import fd_floor, score
    from flashdistill.styles import thicken

    test = load_digits("test")
    thick = thicken(test.images)
    row = score(thick, test.labels, style="thick")
    assert row["fd"] == pytest.approx(0.0, abs=1e-6) and row["pixel_fd"] == pytest.approx(0.0, abs=1e-6)
    assert row["fd_unstyled"] > 1.0 and row["ink"] == pytest.approx(float(((thick + 1) / 2).mean()), rel=1e-6)
    plain = score(thick, test.labels)
    assert "ink" not in plain and plain["fd"] == pytest.approx(row["fd_unstyled"])
    assert fd_floor(300, "thick") != fd_floor(300)


def test_style_and_lora_settings_are_checked():
    from flashdistill.config import from_dict
    from flashdistill.methods.dsm import TeacherConfig

    with pytest.raises(ValueError, match="lora trains a LoRA on a text-to-image teacher: pass --base"):
        from_dict(TeacherConfig, {"lora": True})
    with pytest.raises(ValueError, match="style is for text-to-image teachers"):
        from_dict(TeacherConfig, {"style": "thick", "task": "inpaint"})
    with pytest.raises(ValueError, match="base is for task sketch"):
        from_dict(TeacherConfig, {"base": "x", "task": "sr"})


def test_composition_benchmark_writes_every_row(tmp_path, monkeypatch, tiny_channels):
    """The preset end to end at toy size (2 training steps, 20 samples): rows, targets, report, grid."""
    from flashdistill import benchmark, composition_benchmark as cb

    real_teacher, real_method = benchmark.teacher_config, benchmark.method_config
    toy = {"steps": 2, "batch_size": 4, "sample_every": 2, "checkpoint_every": 2}
    monkeypatch.setattr(benchmark, "teacher_config", lambda o=None: real_teacher(
        {**(o or {}), "channels": tiny_channels, "train": toy}))
    monkeypatch.setattr(benchmark, "method_config", lambda m, t, o=None: real_method(m, t, {**(o or {}), "train": toy}))
    result = cb.run_composition(tmp_path / "out", cache=tmp_path / "cache", num_samples=20, progress=False)
    assert [(r["method"], r["steps"], r["nfe"]) for r in result["rows"]] == [
        ("teacher + style", 32, 64), ("teacher + style", 1, 2), ("teacher + style", 2, 4), ("teacher + style", 4, 8),
        ("flash + style", 1, 1), ("flash + style", 2, 2), ("flash + style", 4, 4),
        ("flash + style (mid 0.5)", 1, 1), ("flash + style (mid 0.5)", 2, 2), ("flash + style (mid 0.5)", 4, 4),
        ("flash + style (mid 0.5, from the 2nd call)", 2, 2), ("flash + style (mid 0.5, from the 2nd call)", 4, 4),
        ("teacher (no style)", 32, 64), ("flash (no style)", 4, 4)]
    assert [r["style_scale"] for r in result["rows"] if "style_scale" in r] == [1.0] * 3 + [{"mid": 0.5}] * 5
    assert [r["style_interval"] for r in result["rows"] if "style_scale" in r] == [None] * 6 + [(0, 998)] * 2
    assert all(r["style"] == "thick" and {"fd_unstyled", "ink", "teacher_mse"} <= set(r) for r in result["rows"])
    assert result["rows"][0]["teacher_mse"] == 0.0  # the reference is teacher + style at 32 steps
    assert set(result["targets"]) >= {"fd_ratio_4step", "fd_within_1.25x", "adherence_within_2_points"}
    assert result["targets_by_stacking"]["flash + style"] == result["targets"]
    assert "flash + style (mid 0.5): adherence within 2 points" in (tmp_path / "out" / "report.md").read_text()
    assert json.loads((tmp_path / "out" / "results.json").read_text())["style"] == "thick"
    assert (tmp_path / "out" / "grid.png").is_file() and "| target |" in (tmp_path / "out" / "report.md").read_text()
    style_dirs = list((tmp_path / "cache").glob("style-thick-*"))
    assert len(style_dirs) == 1 and json.loads((style_dirs[0] / "flashdistill.json").read_text())["kind"] == "lora"
