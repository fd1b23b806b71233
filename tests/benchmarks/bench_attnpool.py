"""open_clip's attention pooling vs safelib's query-only fast path, forward + backward.

Side by side in one run, same inputs, same weights (random RN50 attnpool). Prints times and
the ratio; a ratio, not a timed assertion, because shared machines are noisy.

    python tests/benchmarks/bench_attnpool.py [--batch 128] [--repeats 5] [--model RN50]
"""
import argparse
import statistics
import time

import torch

import safelib as sl


def time_it(step, repeats: int) -> float:
    step()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--model", default="RN50")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    clip = sl.random_clip(args.model)
    pool = clip.attnpool.to(args.device).train()
    for parameter in pool.parameters():
        parameter.requires_grad_(True)
    dense = torch.randn(args.batch, clip.dense_channels, clip.grid, clip.grid, device=args.device).relu()

    def step(forward):
        def run():
            pool.zero_grad(set_to_none=True)
            forward(dense).square().mean().backward()
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    def forward_only(forward):
        def run():
            with torch.no_grad():
                forward(dense)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
        return run

    fast = lambda x: sl.attention_pool(pool, x)  # noqa: E731
    rows = []
    for label, make in (("forward", forward_only), ("forward+backward", step)):
        theirs = time_it(make(pool), args.repeats)
        ours = time_it(make(fast), args.repeats)
        rows.append((label, theirs, ours))
    print(f"{args.model} attnpool, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'pass':<18}{'open_clip s':>12}{'fast s':>10}{'ratio':>8}")
    for label, theirs, ours in rows:
        print(f"{label:<18}{theirs:>12.4f}{ours:>10.4f}{theirs / ours:>7.1f}x")


if __name__ == "__main__":
    main()
