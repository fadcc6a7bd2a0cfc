"""One backbone for the teacher and a LoRA student (issue 14): the teacher's calls are the base
weights bit for bit, the LoRA never leaks into them, frozen weight sets are swapped in and out of
the live module, gradient checkpointing leaves the gradients unchanged, and the frozen weights can
be bf16 while the trainable ones stay float32."""
import json

import pytest
import torch

from flashdistill.config import from_dict
from flashdistill.data.digits import get_dataset
from flashdistill.methods.flash import FlashConfig, FlashDistillation
from flashdistill.models.adapters import lora_layers, swapped_weights
from flashdistill.models.denoiser import Denoiser
from flashdistill.models.loading import load_teacher
from flashdistill.models.student import StudentDenoiser, count_params
from flashdistill.train import enable_gradient_checkpointing

TINY = {"lora_rank": 2, "lr": 1e-3, "disc_lr": 1e-3, "K": 8, "guidance_min": 1.0, "guidance_max": 3.0,
        "phase_steps": [1, 1, 1], "train": {"steps": 4, "batch_size": 4, "checkpoint_every": 2, "log_every": 1}}


def flash(teacher, **over):
    return FlashDistillation(from_dict(FlashConfig, {**TINY, "teacher": str(teacher), **over}))


def perturb_lora(module, seed=0):
    """Non-zero LoRA B matrices (peft starts them at zero), so a leak would show."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "lora_B" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def inputs(model, n=3):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, *model.image_shape, generator=g)
    t = torch.tensor([999.0, 500.0, 20.0][:n])
    return x, t, model.cond(["a handwritten digit three"] * n)


def test_lora_student_is_the_teacher_module_and_never_leaks_into_teacher_calls(tiny_teacher):
    ref = load_teacher(tiny_teacher)
    x, t, cond = inputs(ref)
    with torch.no_grad():
        want, want_feats = ref.denoiser(x, t, cond), ref.denoiser.encoder_features(x, t, cond)

    m = flash(tiny_teacher)
    teacher = m.teacher.denoiser
    assert m.student is teacher.backbone and teacher.lora is False
    assert count_params(m.student)[1] == m.total + m.trainable  # the teacher's weights once, plus the LoRA
    perturb_lora(m.student)
    m.student.train()
    for grad in (False, True):
        with torch.set_grad_enabled(grad):
            xi = x.clone().requires_grad_(grad)
            assert torch.equal(teacher(xi, t, cond), want)
            assert torch.equal(teacher.encoder_features(xi, t, cond), want_feats)
    assert m.student.training and all(mod.training for mod in m.student.modules())  # the mode is restored
    with torch.no_grad():
        on = Denoiser(m.student, m.schedule)(x, t, cond)
        assert not torch.allclose(on, want, atol=1e-3)  # the student's calls see the LoRA
        teacher(x, t, cond)
        assert torch.equal(Denoiser(m.student, m.schedule)(x, t, cond), on)  # and still do after a teacher call


def test_teacher_calls_bypass_the_lora_layers_and_put_them_back(tiny_teacher):
    """A teacher call runs the base layers in the LoRA layers' places (no peft dispatch), and the
    structure is restored afterwards, also when the call raises."""
    from flashdistill.models.adapters import adapter_scope

    m = flash(tiny_teacher)
    teacher, layers = m.teacher.denoiser, lora_layers(m.student)
    x, t, cond = inputs(m.teacher)
    names = [n for n, _ in m.student.named_modules()]
    calls = []
    handles = [layer.register_forward_pre_hook(lambda *_: calls.append(1)) for layer in layers]
    with torch.no_grad():
        teacher(x, t, cond)
        assert not calls
        Denoiser(m.student, m.schedule)(x, t, cond)
        assert len(calls) >= len(layers)
    with pytest.raises(RuntimeError, match="boom"):
        with adapter_scope(m.student, False):
            assert not lora_layers(m.student)
            raise RuntimeError("boom")
    for h in handles:
        h.remove()
    assert [n for n, _ in m.student.named_modules()] == names and lora_layers(m.student) == layers


def test_adapter_switch_follows_structure_changes_after_it_was_used(tiny_teacher):
    """adapter_scope caches what it touches per module; a LoRA injected (or fused) after a first
    call must still be switched off in teacher calls."""
    from flashdistill.models.adapters import adapter_scope, base_copy
    from flashdistill.models.student import fuse_lora, make_student_backbone

    ref = load_teacher(tiny_teacher)
    x, t, cond = inputs(ref)
    module = base_copy(ref.denoiser.backbone)
    teacher = Denoiser(module, ref.schedule, lora=False)
    with torch.no_grad():
        want = teacher(x, t, cond)  # cached: a module without LoRA layers
        make_student_backbone(module, False, 2, None, ["to_q", "to_v"])
        perturb_lora(module)
        assert torch.equal(teacher(x, t, cond), want)
        with adapter_scope(module, True):
            on = Denoiser(module, ref.schedule)(x, t, cond)
        assert not torch.allclose(on, want, atol=1e-3)
        fuse_lora(module)  # the LoRA merged into plain layers: nothing left to switch
        assert not lora_layers(module)
        torch.testing.assert_close(teacher(x, t, cond), on, rtol=1e-4, atol=1e-5)


def test_full_student_is_a_float32_copy(tiny_teacher):
    m = flash(tiny_teacher, full=True)
    assert m.student is not m.teacher.denoiser.backbone and m.teacher.denoiser.lora is None
    assert not lora_layers(m.student) and all(p.requires_grad and p.dtype == torch.float32 for p in m.student.parameters())


def test_models_that_need_their_own_copy_copy_the_teacher_without_the_lora(tiny_teacher):
    from flashdistill.methods.lightning import LightningConfig, LightningDistillation

    m = flash(tiny_teacher, dmd_fake_score="trained")
    fake, teacher = m.fake, m.teacher.denoiser.backbone
    assert fake is not teacher and len(lora_layers(fake)) == len(lora_layers(teacher))
    assert fake.conv_in.weight.data_ptr() != teacher.conv_in.weight.data_ptr()
    light = LightningDistillation(from_dict(LightningConfig, {
        "teacher": str(tiny_teacher), "lora_rank": 2, "stage_steps": [2, 2, 2, 4], "convert_steps": 1,
        "train": {"steps": 10, "batch_size": 4}}))
    assert lora_layers(light.student) and not lora_layers(light.disc)
    assert all(p.dtype == torch.float32 and p.requires_grad for p in light.disc.parameters())
    # the discriminator is the encoder and mid block only: the decoder half is not copied, and
    # the teacher keeps its own
    encoder, teacher = light.disc.encoder.backbone, light.teacher.denoiser.backbone
    assert len(encoder.up_blocks) == 0 and isinstance(encoder.conv_out, torch.nn.Identity)
    assert len(teacher.up_blocks) > 0 and isinstance(teacher.conv_out, torch.nn.Conv2d)
    assert not {p.data_ptr() for p in encoder.parameters()} & {p.data_ptr() for p in teacher.parameters()}
    assert count_params(encoder)[1] < count_params(teacher)[1] / 2


def test_swapped_weights_run_a_frozen_set_and_restore_the_live_one(tiny_teacher):
    m = flash(tiny_teacher)
    perturb_lora(m.student, seed=1)
    live = m.trainable_weights()
    frozen = {n: v + 1.0 for n, v in live.items()}
    x, t, cond = inputs(m.teacher)
    with torch.no_grad():
        before = StudentDenoiser(m.student, m.schedule)(x, t, cond)
        with m.frozen_student(frozen):
            assert all(torch.equal(p, frozen[n]) for n, p in m.student.named_parameters() if n in frozen)
            during = StudentDenoiser(m.student, m.schedule)(x, t, cond)
        after = StudentDenoiser(m.student, m.schedule)(x, t, cond)
    assert torch.equal(before, after) and not torch.allclose(before, during)
    assert all(torch.equal(p, live[n]) for n, p in m.student.named_parameters() if n in live)
    with pytest.raises(RuntimeError, match="no-grad"):
        with swapped_weights(m.student, frozen):
            pass
    with torch.no_grad(), pytest.raises(KeyError, match="nope"):
        with swapped_weights(m.student, {"nope": torch.zeros(1)}):
            pass


def _flash_grads(m, checkpointing: bool):
    """One Flash step in phase 3 (distillation, adversarial through the teacher's encoder, DMD)
    from fixed weights and noise; the student's gradients."""
    data = get_dataset("digits")
    batch = {"image": torch.stack([data[i]["image"] for i in range(4)]), "prompt": [data[i]["prompt"] for i in range(4)]}
    m.setup("cpu")
    models = m.models()
    for p in models["student"].parameters():
        p.grad = None
    losses, logs = m.step(batch, 3, models, torch.Generator().manual_seed(5))
    assert float(logs["adv_g"]) != 0 and "dmd" in logs
    sum(l for _, l in losses).backward()
    return {n: p.grad.clone() for n, p in models["student"].named_parameters() if p.requires_grad}


def test_gradient_checkpointing_gives_the_same_gradients_through_teacher_and_student(tiny_teacher):
    m = flash(tiny_teacher)
    perturb_lora(m.student, seed=2)  # the teacher's encoder pass must not recompute with the LoRA on
    plain = _flash_grads(m, False)
    assert enable_gradient_checkpointing(m.student) == 1
    calls = []
    for mod in m.student.modules():
        if getattr(mod, "gradient_checkpointing", False):
            inner = mod._gradient_checkpointing_func
            mod._gradient_checkpointing_func = lambda *a, _f=inner, **k: (calls.append(1), _f(*a, **k))[1]
    ckpt = _flash_grads(m, True)
    assert calls  # checkpointing was in effect
    assert plain.keys() == ckpt.keys()
    for n in plain:
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-5, atol=1e-8, msg=n)


@pytest.mark.parametrize("method", ["flash", "splam"])
def test_bf16_frozen_weights_with_float32_trainable_weights(tiny_teacher, method):
    from flashdistill.methods import method_module

    module = method_module(method)
    over = {"lora_rank": 2, "dtype": "bf16", "train": {"steps": 4, "batch_size": 4}}
    if method == "flash":
        over.update(K=8, phase_steps=[1, 1, 1])
    else:
        over.update(N=10, gamma_dim=8)
    m = module.Method(from_dict(module.Method.config_class, {"teacher": str(tiny_teacher), **over}))
    frozen = [p for p in m.student.parameters() if not p.requires_grad]
    trainable = [p for p in m.student.parameters() if p.requires_grad]
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    m.setup("cpu")
    data = get_dataset("digits")
    batch = {"image": torch.stack([data[i]["image"] for i in range(4)]), "prompt": [data[i]["prompt"] for i in range(4)]}
    losses, _ = m.step(batch, 3, m.models(), torch.Generator().manual_seed(0))
    sum(l for _, l in losses).backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in trainable)
    # the bf16 teacher's prediction (eps; x0 at t = 999 would amplify it 200x) is the float32 one to bf16 precision
    ref = load_teacher(tiny_teacher)
    x, t, cond = inputs(ref)
    with torch.no_grad():
        torch.testing.assert_close(m.teacher.denoiser.predict(x, t, cond), ref.denoiser.predict(x, t, cond), rtol=0.05, atol=0.05)


def test_compiled_forward_keeps_teacher_and_student_calls_apart(tiny_teacher):
    """train.compile: one compiled forward on the shared module serves the teacher (adapters off)
    and the LoRA student (on), at the same shapes and grad mode, each matching its eager call to
    float rounding; calls with gradients (the student's training forward) and the discriminator's
    features stay eager, so gradients are the eager ones bit for bit."""
    from flashdistill.models.denoiser import uncompile_forward
    from flashdistill.train import compile_models

    m = flash(tiny_teacher)
    perturb_lora(m.student)
    teacher, student = m.teacher.denoiser, StudentDenoiser(m.student, m.schedule)
    x, t, cond = inputs(m.teacher)
    params = [p for p in m.student.parameters() if p.requires_grad]
    want_grads = torch.autograd.grad(student(x, t, cond).square().sum(), params)
    with torch.no_grad():
        want_teacher, want_student = teacher(x, t, cond), student(x, t, cond)
        want_feats = teacher.encoder_features(x, t, cond)
    assert compile_models(m.compile_targets(), "cpu") == [m.student]  # one module: the student is the teacher's
    with torch.no_grad():
        for _ in range(2):  # teacher then student, twice: neither reuses the other's graph
            got_teacher, got_student = teacher(x, t, cond), student(x, t, cond)
            torch.testing.assert_close(got_teacher, want_teacher, rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(got_student, want_student, rtol=1e-4, atol=1e-5)
        assert torch.equal(teacher.encoder_features(x, t, cond), want_feats)
    grads = torch.autograd.grad(student(x, t, cond).square().sum(), params)
    assert all(torch.equal(a, b) for a, b in zip(grads, want_grads))
    uncompile_forward(m.student)
    assert "forward" not in m.student.__dict__ and "_eager_forward" not in m.student.__dict__


def test_train_compile_trains_like_eager_and_restores_the_eager_forward(tiny_teacher, digits_train, tmp_path, monkeypatch):
    """The loop compiles with train.compile (and only then), trains (its first logged loss, computed
    before any update, equals an eager run's) and puts the eager forward back."""
    import flashdistill.train as loop

    seen = []  # what the loop compiled, and whether the forward was compiled once training ran

    def spy(modules, device):
        out = loop_compile(modules, device)
        seen.append(out)
        return out

    loop_compile = loop.compile_models
    monkeypatch.setattr(loop, "compile_models", spy)
    first = {}
    for compiled in (False, True):
        run = flash(tiny_teacher, use_adv=False, use_dmd=False, train={**TINY["train"], "steps": 2, "compile": compiled})
        loop.train(run, digits_train, tmp_path / str(compiled), progress=False)
        assert seen == ([[run.student]] if compiled else [])
        lines = (tmp_path / str(compiled) / "log.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2]
        first[compiled] = json.loads(lines[0])["loss"]
        assert "forward" not in run.student.__dict__  # eager again after training
    assert first[True] == pytest.approx(first[False], rel=1e-4)


def test_train_compile_without_a_cpp_compiler_says_so(monkeypatch):
    import shutil

    from flashdistill.train import compile_models

    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(ValueError, match="C\\+\\+ compiler.*train.compile=false"):
        compile_models([torch.nn.Linear(2, 2)], "cpu")
