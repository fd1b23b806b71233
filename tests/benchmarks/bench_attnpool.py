"""open_clip's attention pooling vs safelib's one-query path, forward and forward + backward.

Side by side in one run, same inputs, same weights (random RN50 attnpool): the ways are interleaved
round by round, so load drifting on a shared machine hits all alike, and each time is the median
over ``--repeats`` rounds. Prints times, ratios to open_clip and the 1-minute load average before
and after; ratios, not timed assertions, because shared machines are noisy. ``--profile`` adds a
torch.profiler table of safelib's forward + backward.

    python tests/benchmarks/bench_attnpool.py [--batch 128] [--repeats 5] [--threads 1] [--model RN50]
"""
import argparse
import os
import statistics
import time

import torch

import safelib as sl
from safelib.clip.attnpool import attention_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--profile", action="store_true", help="print a torch.profiler table of safelib's path")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    clip = sl.random_clip(args.model)
    pool = clip.attnpool.to(args.device).train()
    for parameter in pool.parameters():
        parameter.requires_grad_(True)
    dense = torch.randn(args.batch, clip.dense_channels, clip.grid, clip.grid, device=args.device).relu()

    def sync() -> None:
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def forward_only(forward):
        with torch.no_grad():
            forward(dense)

    def forward_backward(forward):
        pool.zero_grad(set_to_none=True)
        forward(dense).square().mean().backward()

    ways = {"open_clip": pool, "safelib": lambda x: attention_pool(pool, x)}
    passes = {"forward": forward_only, "forward+backward": forward_backward}
    times = {(way, label): [] for way in ways for label in passes}
    load = [os.getloadavg()[0]]
    for round_ in range(args.repeats + 1):  # round 0 warms up
        for way, forward in ways.items():
            for label, run in passes.items():
                start = time.perf_counter()
                run(forward)
                sync()
                if round_:
                    times[way, label].append(time.perf_counter() - start)
        load.append(os.getloadavg()[0])
    median = {key: statistics.median(values) for key, values in times.items()}

    print(f"{args.model} attnpool, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} interleaved rounds; "
          f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    print(f"1-minute load average per round: {' '.join(f'{x:.1f}' for x in load)} on {os.cpu_count()} CPUs")
    print(f"{'pass':<18}{'open_clip s':>12}" + "".join(f"{name + ' s':>12}{'ratio':>8}" for name in ways if name != "open_clip"))
    for label in passes:
        theirs = median["open_clip", label]
        print(f"{label:<18}{theirs:>12.4f}" + "".join(
            f"{median[name, label]:>12.4f}{theirs / median[name, label]:>7.1f}x" for name in ways if name != "open_clip"))

    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
            forward_backward(ways["safelib"])
        print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=20))


if __name__ == "__main__":
    main()
