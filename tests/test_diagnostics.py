"""The discriminator head can learn, and separates known-bad generators from real digits; pixel
statistics of evaluate have the values their definitions give."""
import numpy as np
import pytest
import torch

from flashdistill.data.digits import load_digits
from flashdistill.diagnostics import BAD_GENERATORS, corrupt, discriminator_separation, lightning_separation
from flashdistill.scoring import frechet_distance, histogram_distance, pixel_fd_floor, pixels, score
from flashdistill.models.discriminator import MIN_GROUP_ELEMENTS, DiscriminatorHead, _groups
from flashdistill.models.loading import load_model


@pytest.mark.parametrize("channels,spatial", [(64, 4), (64, 8), (1280, 8), (1152, 32), (8, 2), (3, 1)])
def test_head_groupnorm_groups_hold_enough_values(channels, spatial):
    head = DiscriminatorHead(channels, spatial)
    s = spatial
    for m in head.net:
        if isinstance(m, torch.nn.Conv2d) and m.stride == (2, 2):
            s = (s + 1) // 2
        if isinstance(m, torch.nn.GroupNorm):
            per_group = m.num_channels // m.num_groups * s * s
            assert per_group >= min(MIN_GROUP_ELEMENTS, m.num_channels * s * s), (m, s)
    assert _groups(1280, 4) == 32  # SD scale keeps the usual 32 groups


def test_head_on_1x1_maps_has_a_gradient():
    """The failure the group rule fixes: 32 groups of 2 values on a 1x1 map turn each group into
    +-1 whatever the input, so the logit barely moves with the features."""
    torch.manual_seed(0)
    head = DiscriminatorHead(64, 4)
    x = torch.randn(8, 64, 4, 4, requires_grad=True)
    head(x).sum().backward()
    assert x.grad.abs().mean() > 1e-3


@pytest.fixture(scope="module")
def conditioned_tiny_teacher(tmp_path_factory):
    """A tiny teacher trained for 300 steps (about 20 s): enough for its features to depend on the
    prompt, which an untrained one's do not (a wrong-digit generator then scores chance)."""
    from flashdistill.config import from_dict
    from flashdistill.data.digits import get_dataset
    from flashdistill.methods.dsm import TeacherConfig, TeacherTraining
    from flashdistill.train import train

    out = tmp_path_factory.mktemp("conditioned_teacher")
    cfg = from_dict(TeacherConfig, {"channels": [8, 16], "train": {"steps": 300, "batch_size": 64,
                                                                   "checkpoint_every": 300, "sample_every": 0}})
    train(TeacherTraining(cfg), get_dataset("digits"), out, progress=False)
    return load_model(out)


ACCURACY = [("blurred", 0.9), ("shifted", 0.9), ("wrong_digit", 0.75)]  # the least accuracy each must reach


def test_every_bad_generator_has_a_separation_test():
    assert [k for k, _ in ACCURACY] == list(BAD_GENERATORS)


@pytest.mark.parametrize("kind,accuracy", ACCURACY)
def test_discriminator_separates_known_bad_generators(conditioned_tiny_teacher, kind, accuracy):
    """Flash's head on the frozen teacher's encoder features at t' = 10, trained 150 steps on real
    digits against a deliberately wrong generator, tells them apart on held-out samples."""
    data = load_digits("train")
    real, labels = data.images[:400], data.labels[:400]
    fake, fake_labels = corrupt(real, labels, kind)
    logs = discriminator_separation(conditioned_tiny_teacher, real, labels, fake, fake_labels, t_prime=10, steps=150)
    assert logs["d_accuracy"] > accuracy, logs
    assert logs["d_real"] > logs["d_fake"], logs


def test_lightning_discriminator_separates_blurred_digits_at_low_t_star(conditioned_tiny_teacher):
    """SDXL-Lightning's discriminator (a trainable copy of the teacher's encoder, D' form), trained
    alone for 110 steps at the digits preset's rate, tells real digits from blurred ones re-noised
    at t* = 10 on held-out samples; at t* = 999 (almost pure noise) there is nothing left to see."""
    from flashdistill.data.digits import prompt_for

    data = load_digits("train")
    real, labels = data.images[:400], data.labels[:400]
    fake, _ = corrupt(real, labels, "blurred")
    prompts = [prompt_for(int(d)) for d in labels]
    low = lightning_separation(conditioned_tiny_teacher, real, fake, prompts, t_star=10)
    assert low["d_accuracy"] > 0.9 and low["d_real"] > low["d_fake"], low
    high = lightning_separation(conditioned_tiny_teacher, real, fake, prompts, t_star=999)
    assert high["d_accuracy"] < 0.65, high


def test_corrupt_rejects_unknown_kind():
    with pytest.raises(ValueError, match="unknown bad generator 'noisy'"):
        corrupt(torch.zeros(2, 1, 8, 8), torch.zeros(2, dtype=torch.long), "noisy")


def test_histogram_distance_values():
    zeros, ones = -torch.ones(10, 1, 8, 8), torch.ones(10, 1, 8, 8)  # pixel values 0 and 1
    assert histogram_distance(zeros, ones) == pytest.approx(1.0, abs=1e-3)
    assert histogram_distance(zeros, zeros) == 0.0
    half = torch.zeros(10, 1, 8, 8)  # pixel value 0.5
    assert histogram_distance(zeros, half) == pytest.approx(0.5, abs=1e-3)
    # W1 is symmetric
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(20, 1, 8, 8, generator=g) * 2 - 1, torch.rand(20, 1, 8, 8, generator=g) * 2 - 1
    assert histogram_distance(a, b) == pytest.approx(histogram_distance(b, a), abs=1e-9)


def test_pixel_metrics_rank_real_blurred_and_noise():
    test, train = load_digits("test"), load_digits("train")
    own = score(test.images, test.labels)
    assert own["pixel_fd"] < 1e-6 and own["hist"] == 0.0
    real = score(train.images[:1000], train.labels[:1000])
    blurred = score(*corrupt(train.images[:1000], train.labels[:1000], "blurred"))
    assert real["pixel_fd"] == pytest.approx(pixel_fd_floor(1000), rel=0.5)
    assert blurred["pixel_fd"] > 10 * real["pixel_fd"] and blurred["hist"] > 10 * real["hist"]
    # pixel FD is the Fréchet distance of the flattened [0, 1] pixels
    assert real["pixel_fd"] == pytest.approx(frechet_distance(pixels(train.images[:1000]), pixels(test.images)))
    assert np.allclose(pixels(-torch.ones(1, 1, 2, 2)), 0) and np.allclose(pixels(torch.ones(1, 1, 2, 2)), 1)


def test_profile_step_splits_the_step(tiny_teacher):
    from flashdistill.diagnostics import profile_step

    r = profile_step(tiny_teacher, {"use_adv": True}, steps=2, batch_size=4)
    parts = r["parts_ms"]
    assert r["ms_per_step"] > 0 and r["samples_per_second"] > 0
    for key in ("teacher_target", "teacher_cfg", "adv_features", "student_forward", "forward", "backward", "optimizer"):
        assert parts[key] > 0, key
    # the solve is part of the forward, and of the teacher CFG time
    assert parts["teacher_target"] < parts["forward"] and parts["teacher_cfg_outside_target"] >= 0
    assert parts["forward"] + parts["backward"] + parts["optimizer"] <= r["ms_per_step"] * 1.01


def test_throughput_alternates_batch_sizes_and_rates_them_against_the_smallest_eager(tiny_teacher):
    from unittest import mock

    from flashdistill import diagnostics

    calls = []

    def fake_profile(teacher, overrides, steps, batch_size, compile):  # samples/s grows with the batch
        calls.append((batch_size, compile))
        return {"samples_per_second": batch_size * (1.5 if compile else 1.0) * (1 + 0.1 * len(calls))}

    with mock.patch.object(diagnostics, "profile_step", fake_profile):
        rows = diagnostics.throughput(tiny_teacher, batch_sizes=(8, 4), compile=True, rounds=2, steps=1)
    # alternating: every configuration once per round, the smallest batch's eager run first
    assert calls == [(4, False), (4, True), (8, False), (8, True)] * 2
    assert [(r["batch_size"], r["compile"]) for r in rows] == [(4, False), (4, True), (8, False), (8, True)]
    assert rows[0]["speedup"] == 1.0 and len(rows[0]["samples_per_second"]) == 2
    # per-round ratios: round 1 (calls 1-4) and round 2 (calls 5-8) against that round's baseline
    expected = [(8 * 1.5 * 1.4) / (4 * 1.1), (8 * 1.5 * 1.8) / (4 * 1.5)]
    assert rows[3]["speedup"] == pytest.approx(sum(expected) / 2)
    # and the real step runs through it
    real = diagnostics.throughput(tiny_teacher, batch_sizes=(2,), compile=False, rounds=1, steps=1)
    assert real[0]["median"] > 0 and real[0]["speedup"] == 1.0


def test_one_step_fit_learns_its_pool_and_scores_at_each_checkpoint(tiny_teacher):
    from flashdistill.diagnostics import one_step_fit

    teacher = load_model(tiny_teacher)
    rows = one_step_fit(teacher, ["to_q", "to_v"], rank=2, pool=32, steps=40, eval_at=(1, 40), lr=1e-2, batch_size=8,
                        K=8, num_samples=20)
    assert [r["step"] for r in rows] == [1, 40]
    assert rows[1]["pool_mse"] < 0.8 * rows[0]["pool_mse"]  # it regresses onto the fixed targets
    assert all(np.isfinite(r["fd"]) and 0 <= r["adherence"] <= 1 for r in rows)


def test_one_call_and_own_state_context_error_are_the_task_metric(tmp_path, tiny_teacher):
    """The one-call bound is the task's own metric (inpaint: unmasked_mse) of x0(x_t, t) from the
    true image noised at t: a denoiser that returns the truth scores 0, every t gets a row, and a
    text-to-image teacher is refused in one line."""
    from flashdistill.diagnostics import one_call_context_error
    from flashdistill.methods.dsm import TeacherConfig, TeacherTraining
    from flashdistill.config import from_dict
    from flashdistill.scoring import eval_set

    cfg = from_dict(TeacherConfig, {"channels": [8, 16], "task": "inpaint", "train": {"batch_size": 8, "steps": 2}})
    method = TeacherTraining(cfg)
    method.finalize(tmp_path / "inpaint", method.models())
    teacher = load_model(tmp_path / "inpaint")

    class Oracle:  # a "student" whose every call returns the true images
        task = teacher.task
        cond, spatial = teacher.cond, teacher.spatial
        _, _, _, _, truth = eval_set(16, teacher.task)

        def denoiser(self, x, t, cond):
            return self.truth

    rows = one_call_context_error(teacher, {"oracle": Oracle()}, ts=(999, 30), num_samples=16)
    assert [r["t"] for r in rows] == [999, 30] and all(r["metric"] == "unmasked_mse" for r in rows)
    assert all(r["oracle"] == 0.0 for r in rows)
    assert all(r[k] > 0 for r in rows for k in r if k.startswith("teacher"))
    with pytest.raises(ValueError, match="inpaint or sr teacher"):
        one_call_context_error(load_model(tiny_teacher), num_samples=4)
    # the same metric from the states a student's own sampler reaches: here a "student" that is the
    # teacher without CFG, sampling at [999, 749, 499, 124] with the deterministic move
    import dataclasses

    from flashdistill.diagnostics import own_state_context_error
    from flashdistill.models.student import sample_student

    student = dataclasses.replace(teacher, sampling={"timesteps": {"4": [999, 749, 499, 124]}, "gamma": 0.0})
    r = own_state_context_error(teacher, student, K=8, num_samples=16, guidance=1.0)
    assert r["metric"] == "unmasked_mse" and [row["t"] for row in r["rows"]] == [749, 499, 124]
    # its samples are evaluate's (sample_student, the same seeds), and its last call made them
    prompts, _, seeds, condition, truth = eval_set(16, teacher.task)
    images = teacher.decode(sample_student(student, prompts, seeds, 4, condition=condition))
    assert r["samples"] == teacher.task.metrics(images, condition, truth)["unmasked_mse"] == r["rows"][-1]["student call"]
    # the teacher at w = 1 called on the recorded state is the student's call there
    for row in r["rows"]:
        assert row["teacher call"] == pytest.approx(row["student call"], rel=1e-4)
        assert row["teacher solve"] > 0 and row["teacher solve, true x_t"] > 0
    assert r["rows"][0]["student call"] > r["rows"][-1]["student call"]  # less context error at lower t
    with pytest.raises(ValueError, match="inpaint or sr teacher"):
        own_state_context_error(load_model(tiny_teacher), student, num_samples=4)
