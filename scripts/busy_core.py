#!/usr/bin/env python3
"""Keeps one CPU busy part of the time, as another tenant of a shared host would.

Pinned to CPU `--cpu`, it spins for `--busy-ms` then sleeps for `--idle-ms`, over and over,
until it is stopped. Run beside `bench` on two threads to see how a product behaves when one
of its two cores gives it only part of its time:

    python3 scripts/busy_core.py --cpu 1 --busy-ms 1 --idle-ms 2 &
    target/release/examples/bench --workload small --threads 2 --what eval_forward
    pkill -f busy_core.py

Linux only (it pins itself with `os.sched_setaffinity`).
"""
import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", type=int, default=1, help="the CPU to keep busy")
    parser.add_argument("--busy-ms", type=float, default=1.0, help="milliseconds of spinning")
    parser.add_argument("--idle-ms", type=float, default=2.0, help="milliseconds of sleep")
    args = parser.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    busy, idle = args.busy_ms / 1e3, args.idle_ms / 1e3
    while True:
        start = time.perf_counter()
        while time.perf_counter() - start < busy:
            pass
        time.sleep(idle)


if __name__ == "__main__":
    main()
