"""Teacher-call time on the digits Flash setup (issue 14): the shared module's teacher call with its
LoRA layers swapped out for the call, the same call through peft's disabled-adapter dispatch (the
previous code), and two separate LoRA-free copies of the teacher (the design before the shared
backbone; two, for the noise floor). One process, the same inputs, rounds in random order;
prints the median and minimum milliseconds per call.

    .venv/bin/python scripts/teacher_call_speed.py --teacher runs/teacher --threads 1
"""
from __future__ import annotations

import argparse
import random
import time

import torch


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--teacher", default="runs/teacher", help="a built-in digits teacher folder")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the least noisy)")
    p.add_argument("--rounds", type=int, default=20, help="rounds; each times every variant once (default 20)")
    p.add_argument("--calls", type=int, default=50, help="calls per variant per round (default 50)")
    args = p.parse_args(argv)

    from flashdistill.config import from_dict
    from flashdistill.methods.flash import PRESETS, FlashConfig, FlashDistillation
    from flashdistill.models import adapters
    from flashdistill.models.denoiser import Denoiser

    torch.set_num_threads(args.threads)
    m = FlashDistillation(from_dict(FlashConfig, {**PRESETS["digits"], "teacher": args.teacher}))
    teacher = m.teacher.denoiser
    n = 2 * m.config.train.batch_size  # a CFG teacher call: both branches in one batch
    x = torch.randn(n, *m.teacher.image_shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((n,), 500.0)
    cond = m.teacher.cond(["a handwritten digit three"] * n)
    layout = adapters._layout(m.student)
    places = layout.places
    copies = {name: Denoiser(adapters.base_copy(m.student).eval(), m.schedule) for name in ("copy", "copy2")}
    times = {"swap": [], "dispatch": [], "copy": [], "copy2": []}
    rng = random.Random(0)
    with torch.no_grad():
        for _ in range(10):
            teacher(x, t, cond)
        for _ in range(args.rounds):
            for name in rng.sample(sorted(times), len(times)):
                layout.places = places if name == "swap" else []  # [] = peft's own disabled-adapter path
                call = copies.get(name, teacher)
                t0 = time.perf_counter()
                for _ in range(args.calls):
                    call(x, t, cond)
                times[name].append((time.perf_counter() - t0) / args.calls * 1e3)
        layout.places = places
        assert torch.equal(teacher(x, t, cond), copies["copy"](x, t, cond))
    print(f"{len(layout.layers)} LoRA layers, batch {n}, {args.threads} thread(s), {args.rounds} rounds x {args.calls} calls")
    for name, v in times.items():
        v = sorted(v)
        print(f"{name:9s} median {v[len(v) // 2]:.2f} ms  min {v[0]:.2f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
