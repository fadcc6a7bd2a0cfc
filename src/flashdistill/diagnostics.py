"""Diagnostics of a Flash run on the built-in digits task, each a measured figure:

- ``discriminator_separation``: can a fresh discriminator head, on the frozen teacher's encoder
  features at a given t', tell real digits from a deliberately wrong generator (blurred digits,
  shifted strokes, the wrong digit for the prompt)? Held-out accuracy after a short training run.
- ``lightning_separation``: the same question for SDXL-Lightning's discriminator (a trainable
  copy of the teacher's encoder and its head, the D' form), on two sample sets re-noised at one t*:
  which t* leave it anything to see at this image size.
- ``target_quality``: the distillation *target* itself (the teacher's K-grid DPM-Solver++ solve
  with CFG from noised real digits) scored at each mode: an upper bound of what the student can
  learn from Eq. (2) alone.
- ``regression_error``: the student's one-step error against that target on held-out digits.
- ``one_step_fit``: how far a fresh LoRA gets on the one-step (t = 999) map alone, regressed on a
  fixed pool of teacher targets for many updates: whether the one-step student is short of
  updates or of capacity.
- ``one_call_context_error``: for a conditional teacher (inpaint: the error outside the mask;
  sr: the low-res consistency), the task metric of *one* denoiser call x0(x_t, t) from the noised
  true image, per t, for the teacher and for students: the least error a sampler whose last call
  is at that t can leave, whatever it learned.
- ``own_state_context_error``: the same metric from the states a student's own few-step sampler
  reaches (its calls above each of its timesteps): the student's call there, the teacher's one call
  and the teacher's K-grid solve from that state, beside that solve from the noised true image:
  how much of a few-step sample's context error its own earlier steps carry in, and whether the
  teacher's target from such a state (backward simulation) could remove it.
- ``profile_step`` / ``throughput``: where a Flash step's time goes, and the training samples per
  second at several batch sizes, eager and with ``train.compile``, alternating in one process.

``python -m flashdistill.diagnostics --teacher DIR [--student RUN --what regression]`` prints them.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from .data.digits import load_digits, prompt_for
from .losses import discriminator_loss
from .core.solvers import cfg_model
from .models.discriminator import DiscriminatorHead

BAD_GENERATORS = ("blurred", "shifted", "wrong_digit")


def corrupt(images: torch.Tensor, labels: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """A known-bad 'generator' built from real digits: (images, the digit their prompt names)."""
    if kind == "blurred":
        k = torch.tensor([1.0, 2.0, 1.0])
        k = (k[:, None] * k[None, :] / 16).view(1, 1, 3, 3)
        return F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), k), labels
    if kind == "shifted":
        return torch.roll(images, shifts=(1, 1), dims=(2, 3)), labels
    if kind == "wrong_digit":
        return images, (labels + 1 + torch.arange(len(labels)) % 9) % 10
    raise ValueError(f"unknown bad generator {kind!r}; expected one of {list(BAD_GENERATORS)}")


@torch.no_grad()
def _features(teacher, images, labels, t_prime: int, noise) -> torch.Tensor:
    t = torch.full((len(images),), float(t_prime))
    x = teacher.schedule.add_noise(images, noise, t)
    cond = teacher.cond([prompt_for(int(d)) for d in labels])
    return teacher.denoiser.encoder_features(x, t, cond)


def discriminator_separation(teacher, real, real_labels, fake, fake_labels, t_prime: int, steps: int = 150,
                             batch_size: int = 64, lr: float = 2e-3, seed: int = 0, gan_loss: str = "lsgan") -> dict:
    """Train a fresh head (as in Flash) on the teacher's features of real vs fake samples at
    ``t_prime`` (same noise for both); return its accuracy on a held-out half and its mean logits."""
    g = torch.Generator().manual_seed(seed)
    n = min(len(real), len(fake))
    noise = torch.randn(real[:n].shape, generator=g)
    fr = _features(teacher, real[:n], real_labels[:n], t_prime, noise)
    ff = _features(teacher, fake[:n], fake_labels[:n], t_prime, noise)
    half = n // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        head = DiscriminatorHead(fr.shape[1], fr.shape[-1])
    opt = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    for _ in range(steps):
        idx = torch.randint(half, (batch_size,), generator=g)
        loss, _ = discriminator_loss(head(fr[idx]), head(ff[idx]), gan_loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, logs = discriminator_loss(head(fr[half:]), head(ff[half:]), gan_loss)
    return {k: float(v) for k, v in logs.items()}


def lightning_separation(teacher, real: torch.Tensor, fake: torch.Tensor, prompts: list[str], t_star: int,
                         steps: int = 110, lr: float = 1e-3, batch_size: int = 16, seed: int = 0) -> dict:
    """Train a fresh ``LightningDiscriminator`` (unconditional D', the Lightning preset's AdamW
    betas 0 / 0.99) on the first half of ``real`` against ``fake``, both re-noised at ``t_star``
    with the same noise; its NS-GAN logs (``d_accuracy``, mean logits) on the second half."""
    from .losses import ns_gan_discriminator_loss
    from .methods.lightning import LightningDiscriminator

    sch, cond = teacher.schedule, teacher.cond(prompts)
    pick = (lambda i: {k: v[i] for k, v in cond.items()})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        disc = LightningDiscriminator(teacher.denoiser.backbone, sch, pick(slice(0, 1)), teacher.image_shape)
    opt = torch.optim.AdamW(disc.parameters(), lr=lr, betas=(0.0, 0.99), weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    half = len(real) // 2

    def logits(i):
        noise = torch.randn(real[i].shape, generator=g)
        t = torch.full((len(i),), float(t_star))
        x = torch.cat([sch.add_noise(real[i], noise, t), sch.add_noise(fake[i], noise, t)])
        c = {k: torch.cat([v, v]) for k, v in pick(i).items()}
        return disc(x, torch.cat([t, t]), c, None).chunk(2)

    for _ in range(steps):
        loss, _ = ns_gan_discriminator_loss(*logits(torch.randint(half, (batch_size,), generator=g)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, logs = ns_gan_discriminator_loss(*logits(torch.arange(half, len(real))))
    return {k: float(v) for k, v in logs.items()}


@torch.no_grad()
def _solve(teacher, x0, labels, index: int, K: int, guidance: tuple[float, float], g, chunk: int | None = None):
    """(t, x_t, target): ``x0`` noised at grid point ``index`` of the K-grid and the Eq. (2) target,
    the teacher's DPM-Solver++ solve from there with CFG at w ~ U[guidance] (in chunks of ``chunk``)."""
    from .core.solvers import dpmpp_2m
    from .sample import teacher_timesteps

    n, grid = len(labels), teacher_timesteps(teacher.schedule, K)
    by_digit = teacher.cond([prompt_for(d) for d in range(10)])
    t = grid[index].float().expand(n)
    x_t = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
    target = []
    for i in range(0, n, chunk or n):
        lb = labels[i:i + (chunk or n)]
        w = guidance[0] + (guidance[1] - guidance[0]) * torch.rand(len(lb), generator=g)
        model = cfg_model(teacher.denoiser, {k: v[lb] for k, v in by_digit.items()}, teacher.uncond(len(lb)), w)
        target.append(dpmpp_2m(model, x_t[i:i + len(lb)], grid[index:], teacher.schedule))
    return t, x_t, torch.cat(target)


def _targets(teacher, K: int, guidance: tuple[float, float], split: str, num_samples: int, seed: int):
    """Per mode of the K-grid: (mode, t, x0, labels, x_t, cond, target) from digits of ``split``
    (cycled), the target as in ``_solve``."""
    from .core.timesteps import mode_indices

    data = load_digits(split)
    idx = torch.arange(num_samples) % len(data.labels)
    x0, labels = data.images[idx], data.labels[idx]
    g = torch.Generator().manual_seed(seed)
    cond = teacher.cond([prompt_for(int(d)) for d in labels])
    for mode, index in enumerate(mode_indices(K)):
        t, x_t, target = _solve(teacher, x0, labels, int(index), K, guidance, g)
        yield mode, t, x0, labels, x_t, cond, target


@torch.no_grad()
def target_quality(teacher, K: int, guidance: tuple[float, float], num_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Score the Eq. (2) target at each of the four modes of the K-grid, from train digits (cycled):
    an upper bound of what the student can learn from the distillation loss alone."""
    from .scoring import score

    return [{"mode": mode, "t": int(t[0]), **score(target, labels, x0)}
            for mode, t, x0, labels, _, _, target in _targets(teacher, K, guidance, "train", num_samples, seed)]


@torch.no_grad()
def regression_error(student, teacher, K: int, guidance: tuple[float, float], num_samples: int = 1000,
                     seed: int = 1) -> list[dict]:
    """The student's one-step x0 against the Eq. (2) target on held-out (test) digits, per mode:
    its MSE, the target's own MSE to the clean digit (for scale), and the one-step outputs' scores."""
    from .scoring import score

    rows = []
    for mode, t, x0, labels, x_t, cond, target in _targets(teacher, K, guidance, "test", num_samples, seed):
        pred = student.denoiser(x_t, t, cond)
        rows.append({"mode": mode, "t": int(t[0]), "mse_to_target": float(((pred - target) ** 2).mean()),
                     "target_mse_to_x0": float(((target - x0) ** 2).mean()), **score(pred, labels, target)})
    return rows


def one_step_fit(teacher, targets: list[str], rank: int = 5, pool: int = 4096, steps: int = 2000,
                 eval_at=(250, 500, 1000, 2000), lr: float = 2e-3, batch_size: int = 16, K: int = 16,
                 guidance: tuple[float, float] = (1.0, 2.0), num_samples: int = 1000, seed: int = 0) -> list[dict]:
    """Regress a fresh LoRA (``rank`` on ``targets``) on ``pool`` Eq. (2) targets at the first mode
    (t = 999, train digits, w ~ U[guidance]), reused for ``steps`` AdamW updates of ``batch_size``;
    at each of ``eval_at`` score its one-step samples from pure noise on the evaluation prompts
    (``num_samples``, seeds 0..n-1, as ``flashdistill evaluate``), and its MSE on the pool's first
    256 targets (``pool_mse``: how well it fits what it trains on)."""
    from .models.adapters import base_copy
    from .models.student import StudentDenoiser, make_student_backbone
    from .scoring import eval_prompts, score

    sch, g = teacher.schedule, torch.Generator().manual_seed(seed)
    data = load_digits("train")
    idx = torch.randint(len(data.labels), (pool,), generator=g)
    x0, labels = data.images[idx], data.labels[idx]
    by_digit = teacher.cond([prompt_for(d) for d in range(10)])
    cond_of = lambda lb: {k: v[lb] for k, v in by_digit.items()}  # noqa: E731
    t, x_t, target = _solve(teacher, x0, labels, 0, K, guidance, g, chunk=256)
    t999 = t[0]
    backbone = make_student_backbone(base_copy(teacher.denoiser.backbone), False, rank, None, targets)
    student = StudentDenoiser(backbone, sch)
    opt = torch.optim.AdamW([p for p in backbone.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    prompts, eval_labels, seeds = eval_prompts(num_samples)
    eval_cond = teacher.cond(prompts)
    eval_noise = torch.stack([torch.randn(teacher.image_shape, generator=torch.Generator().manual_seed(s)) for s in seeds])
    rows = []
    for step in range(1, steps + 1):
        b = torch.randint(pool, (batch_size,), generator=g)
        loss = ((student(x_t[b], t999.expand(batch_size), cond_of(labels[b])) - target[b]) ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in eval_at:
            with torch.no_grad():
                x = student(eval_noise, t999.expand(num_samples), eval_cond)
                m = min(pool, 256)
                fit = float(((student(x_t[:m], t999.expand(m), cond_of(labels[:m])) - target[:m]) ** 2).mean())
            rows.append({"step": step, "pool_mse": fit, **score(x, eval_labels)})
    return rows


@torch.no_grad()
def dmd_direction(student, teacher, guidance: tuple[float, float], num_samples: int = 500, seed: int = 2,
                  t_ranges=((0, 249), (250, 499), (500, 749), (750, 999))) -> list[dict]:
    """Is the student a score model of its own samples? For one-step student samples re-noised at
    t'' in each range, the DMD direction ``x0_fake - x0_real`` (fake: the student, real: the teacher
    with CFG) is compared with the pure guidance direction ``x0_cond - x0_real`` (the teacher
    without CFG): cosine near 1 and norm ratio near 1 mean DMD only adds guidance."""
    from .scoring import eval_prompts

    prompts, _, _ = eval_prompts(num_samples)
    g = torch.Generator().manual_seed(seed)
    cond, uncond = student.cond(prompts), teacher.uncond(num_samples)
    x = torch.randn((num_samples, *student.image_shape), generator=g)
    x0 = student.denoiser(x, torch.full((num_samples,), 999.0), cond)
    rows = []
    for lo, hi in t_ranges:
        t = torch.randint(lo, hi + 1, (num_samples,), generator=g).float()
        noisy = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
        w = guidance[0] + (guidance[1] - guidance[0]) * torch.rand(num_samples, generator=g)
        real = cfg_model(teacher.denoiser, cond, uncond, w)(noisy, t)
        fake = student.denoiser(noisy, t, cond)
        plain = teacher.denoiser(noisy, t, cond)
        d, gd = (fake - real).flatten(1), (plain - real).flatten(1)
        cos = torch.nn.functional.cosine_similarity(d, gd, dim=1)
        rows.append({"t_range": [lo, hi], "cos_to_guidance": float(cos.mean()),
                     "norm_ratio": float((d.norm(dim=1) / gd.norm(dim=1).clamp_min(1e-12)).mean())})
    return rows


def _context_metric(teacher, caller: str) -> str:
    """The task's context metric (inpaint: ``unmasked_mse``; sr: ``consistency``); other tasks refused."""
    names = [m for m in teacher.task.metric_names if m in ("unmasked_mse", "consistency")]
    if not names:
        raise ValueError(f"{caller} needs an inpaint or sr teacher (a context metric), not task {teacher.task.name!r}")
    return names[0]


@torch.no_grad()
def one_call_context_error(teacher, students: dict | None = None, ts=(999, 749, 499, 249, 124, 30),
                           num_samples: int = 1000, guidance: float | None = None, seed: int = 0) -> list[dict]:
    """Per t, the task's consistency metric (inpaint: ``unmasked_mse``; sr: ``consistency``) of one
    call x0(x_t, t) on the evaluation set's true images noised at t (one noise draw for all t), for
    the teacher with CFG at ``guidance`` (default: its own) and without, and for each student."""
    from .scoring import eval_set

    task, metric = teacher.task, _context_metric(teacher, "one_call_context_error")
    prompts, _, _, condition, truth = eval_set(num_samples, task)
    x0 = teacher.encode(truth)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sp = teacher.spatial(condition, num_samples, torch.Generator().manual_seed(seed))
    cond, uncond = teacher.cond(prompts, sp), teacher.uncond(num_samples, sp)
    w = teacher.default_guidance if guidance is None else guidance
    calls = {f"teacher, CFG w = {w}": cfg_model(teacher.denoiser, cond, uncond, w), "teacher, no CFG":
             lambda x, t: teacher.denoiser(x, t, cond)}
    for name, s in (students or {}).items():
        scond = s.cond(prompts, s.spatial(condition, num_samples, torch.Generator().manual_seed(seed)))
        calls[name] = lambda x, t, s=s, scond=scond: s.denoiser(x, t, scond)
    rows = []
    for t in ts:
        tt = torch.full((num_samples,), float(t))
        x_t = teacher.schedule.add_noise(x0, noise, tt)
        row = {"t": t, "metric": metric}
        for name, call in calls.items():
            row[name] = task.metrics(teacher.decode(call(x_t, tt)), condition, truth)[metric]
        rows.append(row)
    return rows


@torch.no_grad()
def own_state_context_error(teacher, student, steps: int = 4, K: int = 16, num_samples: int = 1000,
                            guidance: float | None = None) -> dict:
    """For a conditional student's ``steps``-step sampler (seeded as ``evaluate`` seeds it): the
    task's context metric of its samples, and per sampler timestep t below the first, of x0 from
    the state x_t the sampler reaches there: the student's own call, the teacher's one CFG call,
    the teacher's DPM-Solver++ solve on the K-grid from x_t down, and that solve from the true
    image noised at t (one noise draw)."""
    from .core.solvers import dpmpp_2m
    from .models.student import sample_student
    from .sample import seeded_noise, teacher_timesteps
    from .scoring import eval_set

    task, metric = teacher.task, _context_metric(teacher, "own_state_context_error")
    prompts, _, seeds, condition, truth = eval_set(num_samples, task)

    def score(x0):
        return task.metrics(teacher.decode(x0), condition, truth)[metric]

    states = {}  # t -> (the state the sampler calls the student on, the student's x0 there)
    hook = student.denoiser.register_forward_hook(lambda _, args, x0: states.update({int(args[1][0]): (args[0], x0)}))
    try:  # the student's own sampler, seeded as evaluate seeds it, its calls recorded
        samples = sample_student(student, prompts, seeds, steps, batch_size=num_samples, condition=condition)
    finally:
        hook.remove()
    tsp = teacher.spatial(condition, num_samples, torch.Generator().manual_seed(int(seeds[0]) + 7919))  # as sample_student
    model = cfg_model(teacher.denoiser, teacher.cond(prompts, tsp), teacher.uncond(num_samples, tsp),
                      teacher.default_guidance if guidance is None else guidance)
    grid = teacher_timesteps(teacher.schedule, K)
    x0 = teacher.encode(truth)
    rows = []
    noise = seeded_noise(teacher.image_shape, seeds)  # the sampler's first draw
    for t, (x, x0_student) in list(states.items())[1:]:
        tt = torch.full((num_samples,), float(t))
        below = torch.cat([torch.tensor([t]), grid[grid < t]])
        rows.append({"t": t, "student call": score(x0_student), "teacher call": score(model(x, tt)),
                     "teacher solve": score(dpmpp_2m(model, x, below, teacher.schedule)),
                     "teacher solve, true x_t": score(dpmpp_2m(model, teacher.schedule.add_noise(x0, noise, tt), below,
                                                               teacher.schedule))})
    return {"metric": metric, "steps": steps, "samples": score(samples), "rows": rows}


def profile_step(teacher_dir, overrides: dict | None = None, steps: int = 32, batch_size: int = 16,
                 step_index: int = 10_000, compile: bool = False) -> dict:
    """Wall time of one Flash training step (digits preset + ``overrides``; by default at step
    indices in the last phase, every loss on; with ``target_reuse`` R, one step in R solves), split
    into the teacher's Eq. (2) solve, the other teacher CFG calls, the adversarial features, the
    student's forwards, backward and optimizer: ms per step over ``steps`` consecutive steps after
    3 warm-up steps (which hold the compilation with ``compile``: ``train.compile``)."""
    import time
    from collections import Counter
    from unittest import mock

    from .data.digits import get_dataset
    from .methods import flash
    from .models.denoiser import Denoiser
    from .models.student import StudentDenoiser
    from .train import DeterministicBatches

    cfg, _ = flash.build_config(teacher_dir, "digits", overrides or {})
    method = flash.FlashDistillation(cfg)
    method.setup("cpu")
    spent = Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            spent[name] += time.perf_counter() - t0
            return out
        return wrapper

    models = method.models()
    if compile:
        from .train import compile_models

        compile_models(method.compile_targets(), "cpu")
    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], **method.optimizer_settings(n))
            for n, m in models.items()}
    batches = DeterministicBatches(get_dataset("digits"), batch_size, 1, 0, 0, 1)
    g = torch.Generator().manual_seed(0)
    with mock.patch.object(method, "teacher_target", timed("teacher_target", method.teacher_target)), \
            mock.patch.object(flash, "cfg_model", lambda *a, **k: timed("teacher_cfg", cfg_model(*a, **k))), \
            mock.patch.object(Denoiser, "encoder_features", timed("adv_features", Denoiser.encoder_features)), \
            mock.patch.object(StudentDenoiser, "forward", timed("student_forward", StudentDenoiser.forward)):
        for i in range(3 + steps):
            if i == 3:
                spent.clear()
                t_start = time.perf_counter()
            t0 = time.perf_counter()
            losses, _ = method.step(batches.get(i, 0), step_index + i, models, g)  # consecutive (target replay)
            t1 = time.perf_counter()
            for name, loss in losses:
                loss.backward(inputs=[p for p in models[name].parameters() if p.requires_grad])
            t2 = time.perf_counter()
            for opt in opts.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            spent["forward"] += t1 - t0
            spent["backward"] += t2 - t1
            spent["optimizer"] += time.perf_counter() - t2
        total = time.perf_counter() - t_start
    ms = {k: 1000 * v / steps for k, v in spent.items()}
    # teacher_cfg counts every CFG call, the solve's included
    ms["teacher_cfg_outside_target"] = ms.get("teacher_cfg", 0.0) - ms.get("teacher_target", 0.0)
    return {"ms_per_step": 1000 * total / steps, "samples_per_second": batch_size * steps / total, "parts_ms": ms}


def throughput(teacher_dir, batch_sizes=(16, 32, 64), compile: bool = True, rounds: int = 3, steps: int = 16,
               overrides: dict | None = None) -> list[dict]:
    """Training samples per second of the Flash step (digits preset + ``overrides``, last phase) at
    each batch size, eager and (``compile``) with ``train.compile``: the configurations alternate
    in ``rounds`` rounds in one process, so a noisy machine's drift hits them alike. Each row holds
    its per-round samples/s, their median, and the per-round ratio to the first configuration
    (the smallest batch, eager), whose median is the speed-up quoted."""
    import statistics

    configs = [(bs, c) for bs in sorted(set(batch_sizes)) for c in ((False, True) if compile else (False,))]
    per = {cfg: [] for cfg in configs}
    for _ in range(rounds):
        for bs, c in configs:
            per[(bs, c)].append(profile_step(teacher_dir, overrides, steps=steps, batch_size=bs, compile=c)["samples_per_second"])
    base = per[configs[0]]
    return [{"batch_size": bs, "compile": c, "samples_per_second": per[(bs, c)],
             "median": statistics.median(per[(bs, c)]),
             "speedup": statistics.median([a / b for a, b in zip(per[(bs, c)], base)])} for bs, c in configs]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m flashdistill.diagnostics", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="digits teacher folder")
    ap.add_argument("--K", type=int, default=16, help="teacher grid size (digits preset: 16)")
    ap.add_argument("--t-prime", type=int, nargs="+", default=[10, 250, 500, 750], help="re-noising timesteps to probe")
    ap.add_argument("--student", nargs="+", help="student run folder(s): its one-step regression error (--what "
                    "regression, the first), their one-call context error (--what context) and from their own "
                    "4-step sampler's states (--what own-state), a Lightning run "
                    "(--what lightning: its 2-step stage's samples against its 1-step stage's)")
    ap.add_argument("--what", nargs="+", default=["disc", "target"],
                    choices=["disc", "target", "regression", "dmd", "profile", "throughput", "onestep", "context", "own-state",
                             "lightning"])
    ap.add_argument("--compile", action="store_true", help="also time train.compile=true, beside the eager runs (--what "
                                                          "profile: fresh solves and the preset; --what throughput: each batch size)")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[16, 32, 64],
                    help="--what throughput: batch sizes to time (the smallest, eager, is the baseline; default 16 32 64)")
    ap.add_argument("--rounds", type=int, default=3, help="--what throughput: alternating rounds (default 3)")
    ap.add_argument("--fresh", action="store_true", help="--what throughput: a fresh teacher solve every step "
                    "(target_reuse=1, the paper's math) instead of the digits preset's replay")
    ap.add_argument("--lora-rank", type=int, default=5, help="--what onestep: LoRA rank")
    ap.add_argument("--lora-targets", nargs="+", help="--what onestep: LoRA target modules (default: the digits "
                    "family's, attention and feed-forward; add conv1 conv2 for the resnet convolutions)")
    args = ap.parse_args(argv)
    from .models.loading import load_model

    teacher = load_model(args.teacher)
    if {"context", "own-state"} & set(args.what):
        try:
            _context_metric(teacher, "--what context and own-state")
        except ValueError as e:
            ap.error(str(e))
    if "disc" in args.what:
        data = load_digits("train")
        print("discriminator separation (held-out accuracy; chance 0.5)")
        for kind in BAD_GENERATORS:
            fake, fake_labels = corrupt(data.images, data.labels, kind)
            accs = [discriminator_separation(teacher, data.images, data.labels, fake, fake_labels, tp)["d_accuracy"]
                    for tp in args.t_prime]
            print(f"  {kind:<12}" + "  ".join(f"t'={tp}: {a:.3f}" for tp, a in zip(args.t_prime, accs)))
    if "lightning" in args.what:
        from pathlib import Path

        from .sample import sample
        from .scoring import eval_prompts

        if not args.student:
            ap.error("--what lightning needs --student RUN (a Lightning run folder)")
        run = Path(args.student[0])
        prompts, _, seeds = eval_prompts(1024, seed=5)
        real = sample(load_model(run / "stages" / "2", teacher=args.teacher), prompts, seeds, 2, decode=False)
        fake = sample(load_model(run / "stages" / "1", teacher=args.teacher), prompts, seeds, 1, decode=False)
        print(f"Lightning discriminator (fresh, 110 updates at 1e-3): {run}'s 2-step samples against its 1-step "
              f"ones, re-noised at t*; held-out accuracy (chance 0.5)")
        for tp in args.t_prime:
            r = lightning_separation(teacher, real, fake, prompts, tp)
            print(f"  t*={tp:>4}  accuracy {r['d_accuracy']:.3f}  mean logit real {r['d_real']:.3f}  fake {r['d_fake']:.3f}",
                  flush=True)
    if "target" in args.what:
        from .methods.flash import PRESETS

        digits = PRESETS["digits"]
        print("distillation target (teacher K-grid solve from noised train digits), per mode")
        for r in target_quality(teacher, args.K, (digits["guidance_min"], digits["guidance_max"])):
            print(f"  mode {r['mode']} t={r['t']:>4}  FD {r['fd']:.2f}  pixel FD {r['pixel_fd']:.3f}  hist {r['hist']:.4f}  "
                  f"adherence {r['adherence']:.3f}  mse to x0 {r['teacher_mse']:.4f}")
    if {"regression", "dmd"} & set(args.what):
        if not args.student:
            ap.error("--what regression and --what dmd need --student RUN")
        student = load_model(args.student[0])
        cfg = student.meta.get("config", {})  # the run's own grid and guidance range
        K, guidance = cfg.get("K", args.K), (cfg.get("guidance_min", 1.0), cfg.get("guidance_max", 2.0))
    if "regression" in args.what:
        print(f"student one-step regression error on held-out (test) digits, K = {K}, w ~ U{list(guidance)}")
        for r in regression_error(student, teacher, K, guidance):
            print(f"  mode {r['mode']} t={r['t']:>4}  mse to target {r['mse_to_target']:.4f} (target to x0 "
                  f"{r['target_mse_to_x0']:.4f})  one-step FD {r['fd']:.2f}  pixel FD {r['pixel_fd']:.3f}  "
                  f"adherence {r['adherence']:.3f}")
    if "dmd" in args.what:
        print("DMD direction (student as fake score) against the pure guidance direction, one-step samples")
        for r in dmd_direction(student, teacher, guidance):
            print(f"  t'' in {r['t_range']}: cosine {r['cos_to_guidance']:.3f}  norm ratio {r['norm_ratio']:.3f}")
    if "onestep" in args.what:
        from .models.pipelines import LORA_TARGETS

        targets = args.lora_targets or LORA_TARGETS["digits"]
        print(f"one-step (t = 999) fit of a fresh rank-{args.lora_rank} LoRA on {targets}, 4,096 fixed targets")
        for r in one_step_fit(teacher, targets, args.lora_rank, K=args.K):
            print(f"  {r['step']:>5} updates  FD {r['fd']:.2f}  pixel FD {r['pixel_fd']:.3f}  adherence {r['adherence']:.3f}"
                  f"  mse on the pool {r['pool_mse']:.4f}")
    if "context" in args.what:
        students = {s: load_model(s) for s in args.student or []}
        rows = one_call_context_error(teacher, students)
        print(f"{rows[0]['metric']} of one call x0(x_t, t) from the noised true test images (1,000)")
        for r in rows:
            print(f"  t={r['t']:>4}  " + "  ".join(f"{k}: {v:.5f}" for k, v in r.items() if k not in ("t", "metric")))
    if "own-state" in args.what:
        if not args.student:
            ap.error("--what own-state needs --student RUN (a conditional student)")
        for run in args.student:
            r = own_state_context_error(teacher, load_model(run), K=args.K)
            print(f"{run}: {r['metric']} of its {r['steps']}-step samples {r['samples']:.5f}; of x0 from the state its sampler "
                  f"reaches at t (1,000 test conditions; the teacher's solve on the K = {args.K} grid)")
            for row in r["rows"]:
                print(f"  t={row['t']:>4}  " + "  ".join(f"{k}: {v:.5f}" for k, v in row.items() if k != "t"))
    if "profile" in args.what:
        runs = [("digits preset (a teacher solve every 4th step)", {}, False),
                ("a fresh teacher solve every step", {"target_reuse": 1}, False),
                ("fresh solves, with the adversarial term", {"target_reuse": 1, "use_adv": True}, False)]
        if args.compile:
            runs += [("fresh solves, train.compile=true", {"target_reuse": 1}, True),
                     ("digits preset, train.compile=true", {}, True)]
        for label, over, compiled in runs:
            r = profile_step(args.teacher, over, compile=compiled)
            parts = r["parts_ms"]
            print(f"one Flash step, {label}, last phase, batch 16: {r['ms_per_step']:.0f} ms "
                  f"({r['samples_per_second']:.1f} samples/s)")
            for key, name in (("teacher_target", "teacher K-grid CFG solve (Eq. 2)"),
                              ("teacher_cfg_outside_target", "other teacher CFG calls (DMD real score)"),
                              ("student_forward", "student forwards (training, DMD fake score)"),
                              ("adv_features", "teacher encoder features (adversarial)"),
                              ("backward", "backward"), ("optimizer", "optimizer")):
                v = parts.get(key, 0.0)
                print(f"  {name:<46}{v:7.1f} ms {100 * v / r['ms_per_step']:5.1f}%")

    if "throughput" in args.what:
        if any(b < 1 for b in args.batch_sizes) or args.rounds < 1:
            ap.error(f"--batch-sizes {args.batch_sizes} and --rounds {args.rounds} must be positive")
        over = {"target_reuse": 1} if args.fresh else {}
        what = "a fresh teacher solve every step" if args.fresh else "the digits preset (a teacher solve every 4th step)"
        print(f"training samples/s, one Flash step, {what}, last phase; {args.rounds} alternating rounds "
              f"of 16 steps; speed-up: median of the per-round ratios to batch {min(args.batch_sizes)}, eager")
        for r in throughput(args.teacher, args.batch_sizes, compile=args.compile, rounds=args.rounds, overrides=over):
            label = f"batch {r['batch_size']}, {'train.compile' if r['compile'] else 'eager'}"
            print(f"  {label:<26}{r['median']:7.1f} samples/s  {r['speedup']:.2f}x   rounds: "
                  + ", ".join(f"{v:.1f}" for v in r["samples_per_second"]), flush=True)


if __name__ == "__main__":
    main()
