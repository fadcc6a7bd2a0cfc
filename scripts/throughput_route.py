"""The one same-math throughput route of issue 11 that is not built, timed as an upper bound
(docs/quality.md section 11, "The unbuilt route").

A fresh-solve Flash step is timed in three configurations: the `digits` preset with
`target_reuse=1`, the last phase and batch 16. The configurations alternate in one process, in
rounds of 16 steps, so the machine's drift hits all of them alike.
- `eager`: no compilation.
- `compile`: `train.compile` as shipped. The teacher's and other no-grad calls are compiled; the
  student's gradient calls stay eager.
- `route`:
  - the no-grad calls are compiled with inductor's `cpp_wrapper`;
  - the student's gradient calls are compiled with `max_fusion_size=1`, the setting that keeps their
    LoRA gradients right;
  - the teacher solves of four consecutive steps run as one batch of 64 rows.
- `batch`: the shipped compilation with those batched solves.

The four batched steps share one start index. That is the cheapest case of a joined solve: a real
one would start the rows of each step at their own grid point. So `route` and `batch` bound the
route's speed from above. Prints each round and the median ms per step with the speed-ups over
`eager`.

    .venv/bin/python scripts/throughput_route.py --teacher runs/teacher [--rounds 6] [--modes eager,compile,route]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from flashdistill.data.digits import get_dataset
from flashdistill.methods import flash
from flashdistill.tasks import index as index_cond
from flashdistill.train import DeterministicBatches

MODES = ("eager", "compile", "route", "batch")
GROUP, BATCH = 4, 16


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--teacher", required=True, help="the digits teacher folder (runs/teacher)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds of 16 steps per configuration (default 6)")
    ap.add_argument("--modes", default="eager,compile,route", help=f"comma-separated, from {', '.join(MODES)}")
    args = ap.parse_args(argv)
    order = args.modes.split(",")
    if bad := [m for m in order if m not in MODES]:
        ap.error(f"unknown mode(s) {bad}; expected some of {list(MODES)}")

    cfg, _ = flash.build_config(args.teacher, "digits", {"target_reuse": 1})
    method = flash.FlashDistillation(cfg)
    method.setup("cpu")
    models = method.models()
    modules = list({id(m): m for m in method.compile_targets()}.values())
    forwards = {}
    for m in modules:
        eager = m.forward
        shipped = torch.compile(eager, dynamic=False)
        no_grad = torch.compile(eager, dynamic=False, options={"cpp_wrapper": True})
        grad = torch.compile(eager, dynamic=False, options={"max_fusion_size": 1})

        def pick(when_grad, when_not):
            return lambda *a, **k: (when_grad if torch.is_grad_enabled() else when_not)(*a, **k)

        forwards[id(m)] = {"eager": eager, "compile": pick(eager, shipped), "batch": pick(eager, shipped),
                           "route": pick(grad, no_grad)}

    solve_one = method._solved_batch
    big = DeterministicBatches(get_dataset("digits"), GROUP * BATCH, 1, 0, 0, 1)
    queue: list[dict] = []

    def solve_grouped(batch, step, generator):
        if not queue:
            solved = solve_one(big.get(step, 0), step, generator)
            for j in range(GROUP):
                rows = slice(BATCH * j, BATCH * (j + 1))
                queue.append({k: v[rows].contiguous() if torch.is_tensor(v) else index_cond(v, rows)
                              for k, v in solved.items()})
        return queue.pop(0)

    opts = {n: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], **method.optimizer_settings(n))
            for n, m in models.items()}
    batches = DeterministicBatches(get_dataset("digits"), BATCH, 1, 0, 0, 1)
    generator = torch.Generator().manual_seed(0)
    step = 10_000  # the last phase

    def run(mode: str, n: int) -> float:
        nonlocal step
        for m in modules:
            m.forward = forwards[id(m)][mode]
        method._solved_batch = solve_grouped if mode in ("route", "batch") else solve_one
        t0 = time.perf_counter()
        for _ in range(n):
            losses, _ = method.step(batches.get(step, 0), step, models, generator)
            for name, loss in losses:
                loss.backward(inputs=[p for p in models[name].parameters() if p.requires_grad])
            for opt in opts.values():
                opt.step()
                opt.zero_grad(set_to_none=True)
            step += 1
        return 1000 * (time.perf_counter() - t0) / n

    for mode in order:
        run(mode, 2 * GROUP)  # warm-up: the compilations
    times: dict[str, list[float]] = {m: [] for m in order}
    for r in range(args.rounds):
        for mode in order[r % len(order):] + order[:r % len(order)]:
            times[mode].append(run(mode, 4 * GROUP))
        print(f"round {r}: " + ", ".join(f"{m} {v[-1]:.1f} ms" for m, v in times.items()), flush=True)
    med = {m: statistics.median(v) for m, v in times.items()}
    base = med.get("eager")
    for m in order:
        print(f"{m:8s} median {med[m]:7.1f} ms/step  {BATCH * 1000 / med[m]:6.1f} samples/s"
              + (f"  {base / med[m]:.2f}x eager" if base else ""))


if __name__ == "__main__":
    main()
