"""SPLAM at step 0 (student = teacher): RMS of the online prediction F_theta(z_gamma, gamma, t)
against the consistency target F_theta-(xhat_t', 1, t'), per grid timestep t and gamma, for each
``input_scale`` and ``input_time``. What the student must learn before gamma < 1 stops dragging the gamma = 1 map
used at inference (docs/methods.md, "SPLAM at toy scale").

    .venv/bin/python scripts/splam_step0.py --teacher runs/teacher
"""
from __future__ import annotations

import argparse

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher", help="a built-in digits teacher folder")
    p.add_argument("--num", type=int, default=128, help="test digits per timestep (default 128)")
    p.add_argument("--timesteps", type=int, nargs="+", default=[999, 799, 499, 199, 19], help="grid timesteps t")
    p.add_argument("--gammas", type=float, nargs="+", default=[0.0, 0.5, 1.0], help="gamma values")
    p.add_argument("--sigma-form", choices=["code", "linear"], default="code",
                   help="sigma(gamma, t) (default code: the form docs/methods.md's step-0 tables were measured "
                        "with; the method's default is linear)")
    args = p.parse_args(argv)

    from flashdistill.config import from_dict
    from flashdistill.core.timesteps import next_on_grid
    from flashdistill.data.digits import load_digits, prompt_for
    from flashdistill.methods.splam import PRESETS, SPLAMConfig, SPLAMDistillation

    data = load_digits("test")
    n = min(args.num, len(data.labels))
    batch = {"image": data.images[:n], "prompt": [prompt_for(int(label)) for label in data.labels[:n]]}
    print("input           t -> t'  " + "  ".join(f"gamma={g:g}" for g in args.gammas))
    for scale, when in (("none", "t"), ("variance", "t"), ("none", "snr")):
        label = f"time={when}" if when == "snr" else f"scale={scale}"
        m = SPLAMDistillation(from_dict(SPLAMConfig, {**PRESETS["digits"], "teacher": args.teacher, "input_scale": scale,
                                                      "input_time": when, "sigma_form": args.sigma_form}))
        m.setup("cpu")
        models = m.models()
        g = torch.Generator().manual_seed(0)
        x0, cond, uncond = m.inputs(batch, g)
        for t_val in args.timesteps:
            hits = (m.grid == t_val).nonzero()
            if not len(hits):
                raise SystemExit(f"t = {t_val} is not on the grid; pick from {m.grid.tolist()}")
            index = torch.full((n,), int(hits[0, 0]))
            t, t_next = m.grid[index].float(), next_on_grid(m.grid, index, m.config.teacher_steps).float()
            x_t = m.schedule.add_noise(x0, torch.randn(x0.shape, generator=g), t)
            with torch.no_grad():
                x_next = m.teacher_solve(x_t, index, cond, uncond)
                target = m.target(models, x_next, t_next, cond)
                rms = [m.online(models, x_t, x_next, t, t_next, cond, None, torch.full((n,), gam))[0].sub(target)
                       .pow(2).mean().sqrt().item() for gam in args.gammas]
            print(f"{label:14s} {t_val:4d} -> {int(t_next[0]):4d}  " + "  ".join(f"{r:9.3f}" for r in rms), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
