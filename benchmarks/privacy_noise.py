"""The cost of secret DP noise: a fresh OS-entropy seed per draw vs the old run-seeded draw.

    python -m stamen.benchmarks.privacy_noise                  # d = 10^7, 10 repeats
    python -m stamen.benchmarks.privacy_noise --d 1000000 --repeats 20

Times ``NoiseSource.gaussian(d, std, purpose…)`` — what every DP site calls once per release —
for :class:`~stamen.privacy.noise.SecretNoise` (the default: ``secrets`` seeds a private
generator per draw) and :class:`~stamen.privacy.noise.SeededNoise` (``privacy.reproducible_noise``:
the seed derived from the run seed, round and purpose, as every draw was before), next to a bare
``torch.randn`` from one long-lived generator (the floor). Medians over the repeats, interleaved;
the ratio secret ÷ seeded is the cost of unpredictability.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from stamen.privacy.noise import SecretNoise, SeededNoise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--d", type=int, default=10_000_000, help="parameters per draw")
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    secret, seeded, bare = SecretNoise(), SeededNoise(0), torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {"bare torch.randn": [], "seeded (run seed)": [], "secret (OS entropy)": []}
    for r in range(args.repeats + 1):
        for name, draw in (("bare torch.randn", lambda: torch.randn(args.d, generator=bare)),
                           ("seeded (run seed)", lambda: seeded.gaussian(args.d, 1.0, r, "dp-central-noise")),
                           ("secret (OS entropy)", lambda: secret.gaussian(args.d, 1.0, r, "dp-central-noise"))):
            t = time.perf_counter()
            draw()
            if r:  # the first pass warms up allocators
                times[name].append(time.perf_counter() - t)
    base = statistics.median(times["seeded (run seed)"])
    print(f"d = {args.d:,}, {args.repeats} repeats, one thread\n")
    print("| noise | median ms per draw | × seeded |\n|---|---:|---:|")
    for name, ts in times.items():
        print(f"| {name} | {statistics.median(ts) * 1e3:.1f} | {statistics.median(ts) / base:.3f} |")


if __name__ == "__main__":
    main()
