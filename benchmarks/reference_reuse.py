"""How often SAPO draws a replay-buffer pair it has drawn before, which is what `cache_reference_logps` saves.

A pair drawn again before the reference next moves needs no second reference forward. This replays the trainer's
buffer traffic with `sapo.buffer.ReplayBuffer` itself (FIFO, count-weighted draws p ~ 1 / (1 + times drawn)):
every `round_rows / batch` steps a generation round adds `round_rows` entries, and every step draws `batch`.
No model is involved, so it runs in seconds::

    python benchmarks/reference_reuse.py                       # the defaults: buffer 2000, batch 8, rounds of 64
    python benchmarks/reference_reuse.py --refresh_every 500   # scores dropped every 500 steps (refreshes)

It prints, per window of steps, the share of drawn pairs whose reference scores were already known (drawn
since the last refresh), the expected cut in reference forwards.
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Sequence

from sapo.buffer import ReplayBuffer, ReplayEntry


def reused_fractions(capacity: int, batch: int, round_rows: int, steps: int, windows: Sequence[tuple[int, int]],
                     refresh_every: int | None = None, seed: int = 0) -> list[float]:
    """For each [start, end) window of steps, the fraction of drawn pairs drawn before since the last refresh."""
    if round_rows % batch:
        raise ValueError(f"round_rows ({round_rows}) must be a multiple of batch ({batch})")
    buffer, ids = ReplayBuffer(capacity, seed=seed), itertools.count()
    known: set[int] = set()
    reused, drawn = [0] * len(windows), [0] * len(windows)
    for step in range(steps):
        if step % (round_rows // batch) == 0:
            buffer.extend(ReplayEntry([next(ids)], [1], [2], 0, 1) for _ in range(round_rows))
        for entry in buffer.sample(batch):
            for w, (start, end) in enumerate(windows):
                if start <= step < end:
                    drawn[w] += 1
                    reused[w] += entry.entry_id in known
            known.add(entry.entry_id)
        if refresh_every and (step + 1) % refresh_every == 0:
            known.clear()
    return [r / d if d else 0.0 for r, d in zip(reused, drawn, strict=True)]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--capacity", type=int, default=2000, help="max_replay_buffer_size")
    parser.add_argument("--batch", type=int, default=8, help="per_device_train_batch_size")
    parser.add_argument("--round_rows", type=int, default=64, help="examples per generation round")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--refresh_every", type=int, default=None, help="ref_update_steps (default: never)")
    args = parser.parse_args(argv)
    steady = max(0, args.steps - 2000)
    windows = [(0, min(250, args.steps)), (steady, args.steps)]
    fractions = reused_fractions(args.capacity, args.batch, args.round_rows, args.steps, windows, args.refresh_every)
    print(f"buffer {args.capacity}, batch {args.batch}, rounds of {args.round_rows}, refresh every "
          f"{args.refresh_every or 'never'}")
    for (start, end), fraction in zip(windows, fractions, strict=True):
        print(f"steps {start}-{end}: {fraction:.1%} of drawn pairs were drawn before (reference forward saved)")


if __name__ == "__main__":
    main()
