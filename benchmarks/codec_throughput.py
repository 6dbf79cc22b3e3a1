"""Codec encode/decode throughput and extra peak memory, against a memory copy of the same update.

    python -m stamen.benchmarks.codec_throughput --sizes 1e5,1e6,1e7 --out results.json

For every size d and every registered codec (default options) it reports:

* ``encode`` / ``decode``: best wall time over repeats with the round's operator already
  built (a warm cache, as within a round), throughput in GB/s of the fp32 update
  (4·d bytes / time), and ``x/copy``, the ratio to ``x.clone()`` of the same tensor
  (1.0 = as fast as copying the update). The copy is timed alternately with each codec
  call, so both see the same machine load; the ``x.clone()`` row is its best time at that d.
  At d <= 1e6 the update fits in cache and the copy runs at cache speed, which no
  scatter/gather codec can match; d = 1e7 is the size where the ratio means "vs. DRAM".
* ``first``: the first encode of a round, which also builds the operator (hash tables,
  sign vectors, row samples).
* ``peak``: extra peak resident memory of one call, as a multiple of the update size 4·d.
  Method: the kernel's high-water mark. We reset it (``/proc/self/clear_refs`` ← 5), read
  ``VmRSS`` before the call and ``VmHWM`` after; the difference is the most memory the call
  held above what was already resident, including its output. glibc would otherwise serve
  large blocks from freed heap memory that is already resident (hiding them), so memory is
  measured in a child process started with ``MALLOC_MMAP_THRESHOLD_=65536`` (every block
  over 64 KiB is a fresh mapping, returned on free); timings are taken in this process with
  the ordinary allocator, so page faults do not distort them. Linux only, else "n/a".
* ``cache``: random state the cached operator keeps alive between calls (not in ``peak``).

Codecs that refuse a size (the dense Gaussian/Rademacher sketches at large d) are listed
with their error message. Numbers depend on the machine and its load: compare ratios
within one run, not across runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any, Callable

import torch

from stamen.core import Layout
from stamen.sketching.codec import CODECS, CodecContext, make_codec
from stamen.sketching.codecs_sketch import SketchCodec, clear_operator_cache

MMAP_ENV = "MALLOC_MMAP_THRESHOLD_"


# -- measurement helpers ---------------------------------------------------------------------
def parse_sizes(text: str) -> list[int]:
    sizes = [int(float(part)) for part in text.split(",") if part.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"--sizes needs positive numbers like 1e5,1e6, got {text!r}")
    return sizes


def best_time(fn: Callable[[], Any], repeats: int, budget_s: float) -> float:
    """Minimum wall time of ``fn`` over up to ``repeats`` calls, stopping once ``budget_s`` is spent."""
    best, spent = float("inf"), 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best


def paired_best_times(fn: Callable[[], Any], baseline: Callable[[], Any], repeats: int,
                      budget_s: float) -> tuple[float, float]:
    """Best times of ``fn`` and of ``baseline``, measured alternately so that both see the same
    machine load (on a shared machine the load drifts between measurements)."""
    best_fn = best_base = float("inf")
    spent = 0.0
    for _ in range(repeats):
        best_base = min(best_base, best_time(baseline, 3, budget_s))
        elapsed = best_time(fn, 1, float("inf"))
        best_fn, spent = min(best_fn, elapsed), spent + elapsed
        if spent > budget_s:
            break
    return best_fn, best_base


def _status_kib() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, value = line.split(":")
                out[key] = int(value.split()[0])
    return out


def extra_peak_bytes(fn: Callable[[], Any]) -> int | None:
    """Peak resident memory ``fn`` adds above the current RSS (see the module docstring)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _status_kib()["VmRSS"]
    except OSError:
        fn()
        return None
    result = fn()
    peak = _status_kib()["VmHWM"]
    del result
    return max(0, peak - before) * 1024


# -- one codec at one size -------------------------------------------------------------------
def setup(d: int) -> tuple[torch.Tensor, CodecContext]:
    x = torch.randn(d, generator=torch.Generator().manual_seed(d))
    return x, CodecContext(seed=0, round=1, layout=Layout(("update",), ((d,),)), node=0)


def warm_codec(name: str, x: torch.Tensor, ctx: CodecContext) -> tuple[Any, dict, float] | str:
    """(codec, payload, seconds of the first encode) with the operator built, or the refusal."""
    codec = make_codec(name)
    clear_operator_cache()
    try:
        start = time.perf_counter()
        payload = codec.encode(x, ctx, {})
        return codec, payload, time.perf_counter() - start
    except ValueError as exc:
        return str(exc)


def time_codec(name: str, x: torch.Tensor, ctx: CodecContext, repeats: int, budget_s: float) -> dict:
    d = x.numel()
    row: dict[str, Any] = {"codec": name, "d": d, "linear": CODECS[name].linear}
    warm = warm_codec(name, x, ctx)
    if isinstance(warm, str):
        row["refused"] = warm
        return row
    codec, payload, row["first_encode_s"] = warm
    row["payload_bytes"] = codec.payload_bytes(payload)
    row["cache_bytes"] = codec.operator(ctx).state_bytes if isinstance(codec, SketchCodec) else 0
    calls = {"encode": lambda: codec.encode(x, ctx, {}),  # fresh state: no error feedback carried over
             "decode": lambda: codec.decode(payload, ctx)}
    for what, fn in calls.items():
        seconds, copy_s = paired_best_times(fn, x.clone, repeats, budget_s)
        row[f"{what}_s"] = seconds
        row[f"{what}_copy_s"] = copy_s
        row[f"{what}_gbps"] = 4 * d / seconds / 1e9
        row[f"{what}_vs_copy"] = copy_s / seconds
    return row


def memory_probe(d: int, codecs: list[str]) -> dict:
    """Extra peak bytes of clone/encode/decode per codec (run in the MALLOC_MMAP_THRESHOLD_ child)."""
    x, ctx = setup(d)
    out: dict[str, Any] = {"x.clone()": {"copy": extra_peak_bytes(x.clone)}}
    for name in codecs:
        warm = warm_codec(name, x, ctx)
        if isinstance(warm, str):
            continue
        codec, payload, _ = warm
        out[name] = {"encode": extra_peak_bytes(lambda: codec.encode(x, ctx, {})),
                     "decode": extra_peak_bytes(lambda: codec.decode(payload, ctx))}
        del codec, payload
        clear_operator_cache()
    return out


def probe_memory_in_child(d: int, codecs: list[str], threads: int) -> dict:
    if not sys.platform.startswith("linux"):
        return {}
    cmd = [sys.executable, "-m", "stamen.benchmarks.codec_throughput", "--memory-probe", str(d),
           "--codecs", ",".join(codecs), "--threads", str(threads)]
    proc = subprocess.run(cmd, env={**os.environ, MMAP_ENV: "65536"}, capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"memory probe failed for d={d}: {proc.stderr.strip()[-500:]}", file=sys.stderr)
        return {}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_size(d: int, codecs: list[str], repeats: int, budget_s: float, threads: int) -> tuple[dict, list[dict]]:
    memory = probe_memory_in_child(d, codecs, threads)
    x, ctx = setup(d)
    rows = []
    for name in codecs:
        row = time_codec(name, x, ctx, repeats, budget_s)
        row["encode_peak_bytes"] = memory.get(name, {}).get("encode")
        row["decode_peak_bytes"] = memory.get(name, {}).get("decode")
        rows.append(row)
        print(format_row(row), flush=True)
    copies = [row[key] for row in rows for key in ("encode_copy_s", "decode_copy_s") if key in row]
    copy_s = min(copies + [best_time(x.clone, max(repeats, 20), budget_s)])
    baseline = {"d": d, "copy_s": copy_s, "copy_gbps": 4 * d / copy_s / 1e9,
                "copy_peak_bytes": memory.get("x.clone()", {}).get("copy")}
    print(format_baseline(baseline), flush=True)
    return baseline, rows


# -- output ----------------------------------------------------------------------------------
HEADER = (f"{'d':>9} {'codec':<12} {'payload':>8} {'first s':>8} {'enc ms':>9} {'enc GB/s':>8} {'enc/copy':>8} "
          f"{'dec ms':>9} {'dec GB/s':>8} {'dec/copy':>8} {'enc peak':>8} {'dec peak':>8} {'cache':>7}")


def _times(value: int | None, d: int) -> str:
    return "n/a" if value is None else f"{value / (4 * d):.2f}x"


def format_row(row: dict) -> str:
    d = row["d"]
    if "refused" in row:
        return f"{d:>9.0e} {row['codec']:<12} refused: {row['refused']}"
    return (f"{d:>9.0e} {row['codec']:<12} {row['payload_bytes'] / (4 * d):>7.3f}x {row['first_encode_s']:>8.3f} "
            f"{1e3 * row['encode_s']:>9.2f} {row['encode_gbps']:>8.3f} {row['encode_vs_copy']:>8.3f} "
            f"{1e3 * row['decode_s']:>9.2f} {row['decode_gbps']:>8.3f} {row['decode_vs_copy']:>8.3f} "
            f"{_times(row['encode_peak_bytes'], d):>8} {_times(row['decode_peak_bytes'], d):>8} "
            f"{row['cache_bytes'] / (4 * d):>6.2f}x")


def format_baseline(base: dict) -> str:
    return (f"{base['d']:>9.0e} {'x.clone()':<12} {'':>8} {'':>8} {1e3 * base['copy_s']:>9.2f} "
            f"{base['copy_gbps']:>8.3f} {1.0:>8.3f} {'':>9} {'':>8} {'':>8} {_times(base['copy_peak_bytes'], base['d']):>8}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=parse_sizes, default=parse_sizes("1e5,1e6,1e7"))
    parser.add_argument("--codecs", default="", help="comma-separated codec names (default: all registered)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of repeats per measurement, at most")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(),
                        help="torch intra-op threads (default: torch's choice); 1 gives stable numbers on a busy machine")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    parser.add_argument("--memory-probe", type=int, default=0, help=argparse.SUPPRESS)  # internal: child mode
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    make_codec("dense")  # registers every built-in codec
    codecs = [c for c in args.codecs.split(",") if c] or sorted(CODECS)
    unknown = sorted(set(codecs) - set(CODECS))
    if unknown:
        parser.error(f"unknown codecs {unknown}; choose from {sorted(CODECS)}")
    if args.memory_probe:
        print(json.dumps(memory_probe(args.memory_probe, codecs)))
        return 0

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}")
    print("payload/peak/cache are multiples of the fp32 update size 4*d; x/copy = throughput relative to x.clone()")
    print(HEADER)
    results = {"torch": torch.__version__, "threads": torch.get_num_threads(), "machine": platform.platform(),
               "baselines": [], "rows": []}
    for d in args.sizes:
        baseline, rows = bench_size(d, codecs, args.repeats, args.budget, args.threads)
        results["baselines"].append(baseline)
        results["rows"].extend(rows)
    if args.out:
        tmp = f"{args.out}.tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=2)
        os.replace(tmp, args.out)  # nothing half-written
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
