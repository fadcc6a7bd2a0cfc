"""Does a full LCM student use the scale its w-embedding tells it? The student's x0 difference
between two scales (g = 3 and g = 1) on noised digits, against the teacher's one-call CFG x0
difference at the same inputs: ratio of norms and cosine, per timestep (docs/methods.md, "Full LCM:
the w-embedding").

    .venv/bin/python scripts/lcm_w_probe.py --runs runs/lcm-full          # trained students
    .venv/bin/python scripts/lcm_w_probe.py --regress 600                  # the same student and
        # embedding regressed directly on the teacher's guided x0 at a random scale (no bootstrapping)
    .venv/bin/python scripts/lcm_w_probe.py --target-grids 50 10           # at step 0, how much of
        # the scale's effect LCM's consistency target carries (one skip's worth of guidance)
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher", help="a built-in digits teacher folder")
    p.add_argument("--runs", nargs="*", default=[], help="full LCM runs with a w-embedding to probe")
    p.add_argument("--regress", type=int, default=0, help="steps of direct regression to run and probe (0: none)")
    p.add_argument("--num", type=int, default=64, help="digits per probe (default 64)")
    p.add_argument("--timesteps", type=float, nargs="+", default=[999.0, 799.0, 499.0], help="probe timesteps")
    p.add_argument("--scales", type=float, nargs=2, default=[1.0, 3.0], help="the two scales g compared")
    p.add_argument("--target-grids", type=int, nargs="*", default=[], help="grid sizes N for the step-0 target probe")
    args = p.parse_args(argv)

    from flashdistill.config import from_dict
    from flashdistill.core.solvers import cfg_model
    from flashdistill.data.digits import get_dataset
    from flashdistill.methods.lcm import PRESETS, LCMConfig, LCMDistillation
    from flashdistill.models.loading import load_model
    from flashdistill.models.student import StudentDenoiser, guidance_embedding

    teacher = load_model(args.teacher)
    data = get_dataset("digits")
    gen = torch.Generator().manual_seed(0)

    def batch(n):
        items = [data[int(i)] for i in torch.randint(0, len(data), (n,), generator=gen)]
        return torch.stack([it["image"] for it in items]).float(), [it["prompt"] for it in items]

    x0, prompts = batch(args.num)
    cond, uncond = teacher.cond(prompts), teacher.uncond(args.num)
    lo, hi = args.scales

    def probe(name, denoiser, dim):
        for tv in args.timesteps:
            t = torch.full((args.num,), tv)
            x = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t)
            with torch.no_grad():
                d_t = cfg_model(teacher.denoiser, cond, uncond, hi)(x, t) - cfg_model(teacher.denoiser, cond, uncond, lo)(x, t)
                told = {g: {**cond, "timestep_cond": guidance_embedding(torch.full((args.num,), g), dim)} for g in (lo, hi)}
                d_s = denoiser(x, t, told[hi]) - denoiser(x, t, told[lo])
            cos = torch.nn.functional.cosine_similarity(d_s.flatten(), d_t.flatten(), dim=0)
            print(f"{name}  t={int(tv)}  |student diff| / |teacher diff| {d_s.norm() / d_t.norm():.3f}  cosine {cos:.3f}")

    for run in args.runs:
        student = load_model(run)
        spec = student.sampling.get("w_embedding")
        if not spec:
            raise SystemExit(f"{run!r} has no w-embedding (a full LCM run with w_mode=embedded)")
        probe(run, student.denoiser, int(spec["dim"]))

    from flashdistill.core.timesteps import next_on_grid

    for n_grid in args.target_grids:  # student = teacher: F(xhat_t'(g), t') between the scales
        m = LCMDistillation(from_dict(LCMConfig, {"teacher": args.teacher, "full": True, "N": n_grid, "guidance": lo,
                                                  "guidance_range": [lo, hi]}))
        m.setup("cpu")
        for tv in args.timesteps:
            index = torch.full((args.num,), int(torch.argmin((m.grid.float() - tv).abs())))
            t, t_n = m.grid[index].float(), next_on_grid(m.grid, index, 1).float()
            x = teacher.schedule.add_noise(x0, torch.randn(x0.shape, generator=torch.Generator().manual_seed(1)), t)
            with torch.no_grad():
                tgt = {g: StudentDenoiser(m.student, m.schedule)(m.teacher_solve(x, index, cond, uncond, g), t_n, cond)
                       for g in (lo, hi)}
                d_t = cfg_model(teacher.denoiser, cond, uncond, hi)(x, t) - cfg_model(teacher.denoiser, cond, uncond, lo)(x, t)
            print(f"target N={n_grid}  t={int(t[0])} -> {int(t_n[0])}  |target diff| / |teacher diff| "
                  f"{(tgt[hi] - tgt[lo]).norm() / d_t.norm():.3f}")

    if args.regress:
        torch.manual_seed(0)
        digits = PRESETS["digits"]
        cfg = from_dict(LCMConfig, {"teacher": args.teacher, "full": True, "guidance": digits["guidance"],
                                    "guidance_range": digits["guidance_range"]})
        m = LCMDistillation(cfg)
        m.setup("cpu")
        dim = cfg.w_embedding_dim
        opt = torch.optim.AdamW([q for q in m.student.parameters() if q.requires_grad], lr=digits["full_lr"], weight_decay=0)
        denoiser = StudentDenoiser(m.student, m.schedule)
        g_lo, g_hi = cfg.guidance_range
        for step in range(1, args.regress + 1):
            xb, pb = batch(16)
            c, u = teacher.cond(pb), teacher.uncond(16)
            t = m.grid[torch.randint(0, cfg.N, (16,), generator=gen)].float()
            x = teacher.schedule.add_noise(xb, torch.randn(xb.shape, generator=gen), t)
            g = g_lo + (g_hi - g_lo) * torch.rand(16, generator=gen)
            with torch.no_grad():
                target = cfg_model(teacher.denoiser, c, u, g)(x, t)
            loss = (denoiser(x, t, {**c, "timestep_cond": guidance_embedding(g, dim)}) - target).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if step % 100 == 0 or step == args.regress:
                probe(f"regression step {step}", denoiser, dim)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
