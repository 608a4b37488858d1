#!/usr/bin/env python3
"""The crate beside PyTorch on the reference workloads, measured back to back.

For each workload, thread count and measurement it runs `scripts/bench_torch.py` (PyTorch)
and then the crate's `bench` example (`cargo build --release --example bench` first), each
in a fresh process with the same --workload, --threads, --steps, --warmup and --seed, the
crate with RAYON_NUM_THREADS set to the thread count as well. It prints both medians, the
speed-up (PyTorch's median / the crate's median: above 1 the crate is faster), the crate's
GFLOP/s (FLOP model of scripts/README.md) and the fraction of the machine's FMA peak that
this is (the peak measured by `bench --peak`, or given with --peak-gflops).

Decoding: the crate's `greedy_decode` uses its key/value cache. It is set beside both of
PyTorch's decodes, which run in one process right before it:
  greedy_decode  nn.Transformer as it is, re-running the prefix at every step (no cache);
  cached_decode  a key/value cache written by hand over the same nn.Transformer weights.
so a decoding row has two speed-ups: against greedy_decode and against cached_decode.

--precision is passed to both sides: fp32, or bf16 (PyTorch under autocast, the crate's bf16
mixed precision). A `bench` built before it had --precision is asked for fp32 only, and
--precision bf16 then stops with a message.

--rounds N runs each pair (PyTorch, then the crate) N times in turn and reports the median
of each side's medians and the median of the N speed-ups, each measured back to back, with
their range: on a shared machine whose speed drifts by the minute, a cell then rests on N
pairs rather than one.

--batch N runs both sides at a batch of N instead of each workload's (--batch 1: decoding one
sequence at a time), the rest of the workload as it is: no longer the reference workloads,
and the FLOP model counts that batch.

--markdown FILE writes the results as Markdown: the machine and versions, a table with one
row per workload, thread count and measurement (decoding twice: against PyTorch without and
with a cache), and a summary of speed-ups in the layout of the README's speed table.

Run from anywhere; paths default to this repository. Nothing else should run meanwhile.

    python3 scripts/compare.py --python .venv-torch/bin/python --workloads tiny --threads 1
    python3 scripts/compare.py --python .venv-torch/bin/python --markdown speed.md
    python3 scripts/compare.py --workloads small --what train_step eval_forward --steps 20
"""
import argparse
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MEASUREMENTS = ("train_step", "eval_forward", "greedy_decode")
NAMES = {"train_step": "train step", "eval_forward": "eval forward", "greedy_decode": "greedy decode"}


def run_json(cmd, env=None):
    """Run cmd; return ({what: record} from its JSON lines, its '#' stderr header lines)."""
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    recs = {}
    for line in out.stdout.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "what" in rec:
            recs[rec["what"]] = rec
    if out.returncode != 0:
        sys.stderr.write(f"failed ({out.returncode}): {' '.join(cmd)}\n{out.stderr[-800:]}\n")
    header = [line for line in out.stderr.splitlines() if line.startswith("#")]
    return recs, header


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def times(x):
    return "-" if x is None else f"{x:.2f}×"


def ratio(a, b):
    return None if a is None or b is None else a / b


def median(xs):
    """The median of the values that are not None (the mean of the middle two if even)."""
    xs = sorted(x for x in xs if x is not None)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def spread(xs):
    """'min–max×' of the values that are not None, or '-'."""
    xs = [x for x in xs if x is not None]
    return f"{min(xs):.2f}–{max(xs):.2f}×" if xs else "-"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    default_python = ROOT / ".venv-torch" / "bin" / "python"
    ap.add_argument("--python", default=os.environ.get("TORCH_PYTHON") or
                    (str(default_python) if default_python.exists() else sys.executable),
                    help="a Python that has torch (default: $TORCH_PYTHON, else .venv-torch/bin/python "
                         "of this repository if present, else this Python)")
    ap.add_argument("--bench", default=str(ROOT / "target" / "release" / "examples" / "bench"),
                    help="the crate's bench example (default: target/release/examples/bench of this repository)")
    ap.add_argument("--workloads", nargs="+", choices=("tiny", "small", "base"), default=["tiny", "small", "base"])
    ap.add_argument("--threads", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--what", nargs="+", choices=MEASUREMENTS, default=list(MEASUREMENTS),
                    help="measurements (greedy_decode also runs PyTorch's cached_decode)")
    ap.add_argument("--steps", type=int, default=None,
                    help="measured repetitions (default: 100 for tiny, whose steps take milliseconds and whose "
                         "medians over 10 moved with the host by a third; 10 for small; 5 for base). A number "
                         "given applies to tiny and small; base uses max(3, steps // 2)")
    ap.add_argument("--warmup", type=int, default=3, help="unmeasured repetitions first (default 3)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="run each pair of processes (PyTorch, then the crate) this many times in turn and "
                         "report medians, with the range of the speed-ups (default 1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch", type=int, default=None,
                    help="the batch instead of each workload's, on both sides (1: one sequence at a time); "
                         "no longer the reference workloads")
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                    help="passed to both sides; anything but fp32 needs the crate's bench to accept --precision")
    ap.add_argument("--peak-gflops", nargs="+", type=float, metavar="P",
                    help="the machine's FMA peak in GFLOP/s at 1, 2, ... threads (e.g. 240 483), for the "
                         "crate's fraction of peak; by default measured with the crate's `bench --peak`")
    ap.add_argument("--markdown", metavar="FILE", help="also write the results as Markdown tables to FILE")
    ap.add_argument("--jsonl", metavar="FILE", help="also write every JSON line of both sides to FILE")
    args = ap.parse_args()

    bench = Path(args.bench)
    if not bench.exists():
        sys.exit(f"{bench} not found: build the crate's bench example first (cargo build --release --example bench)")
    bench_help = subprocess.run([str(bench), "--help"], capture_output=True, text=True).stdout
    crate_has_precision = "--precision" in bench_help
    if args.precision != "fp32" and not crate_has_precision:
        sys.exit(f"the crate's bench has no --precision option: only fp32 can be compared for now "
                 f"(PyTorch alone: {args.python} {HERE / 'bench_torch.py'} --precision {args.precision} ...)")
    if args.peak_gflops:
        peak = {i + 1: p for i, p in enumerate(args.peak_gflops)}
    else:
        # The crate measures the FMA peak itself: every thread runs a chain of FMAs at once.
        peak = {}
        out = subprocess.run([str(bench), "--peak", "--json", "--threads", str(max(args.threads))],
                             capture_output=True, text=True).stdout
        for line in out.splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("what") == "fma_peak":
                peak[rec["threads"]] = rec["gflops"]
        print(f"# FMA peak measured by {bench} --peak: " +
              ", ".join(f"{p:g} GFLOP/s at {t} thread(s)" for t, p in peak.items()))

    rows = []  # dicts: workload, threads, what, torch, crate, torch_cached
    headers = []
    if args.batch is not None:
        print(f"# batch {args.batch} on both sides instead of each workload's: not the reference workloads")
    jsonl = open(args.jsonl, "w") if args.jsonl else None
    print(f"{'workload':>8} {'thr':>3} {'what':<14} {'torch ms':>10} {'crate ms':>10} {'speed-up':>9} "
          f"{'crate GFLOP/s':>14} {'of peak':>8}   decoding: {'torch cached ms':>15} {'speed-up':>9}")
    for wl in args.workloads:
        steps = steps_for(args, wl)
        for th in args.threads:
            for what in args.what:
                common = ["--workload", wl, "--threads", str(th), "--steps", str(steps), "--warmup", str(args.warmup),
                          "--seed", str(args.seed), "--json"]
                if args.batch is not None:
                    common += ["--batch", str(args.batch)]
                torch_what = [what, "cached_decode"] if what == "greedy_decode" else [what]
                crate_cmd = [str(bench), *common, "--what", what]
                if crate_has_precision:
                    crate_cmd += ["--precision", args.precision]
                rounds = []  # per round: (torch ms, crate ms, crate GFLOP/s, torch cached ms)
                for _ in range(max(1, args.rounds)):
                    torch_recs, h1 = run_json([args.python, str(HERE / "bench_torch.py"), *common,
                                               "--precision", args.precision, "--what", *torch_what])
                    crate_recs, h2 = run_json(crate_cmd, env={**os.environ, "RAYON_NUM_THREADS": str(th)})
                    if not headers:
                        headers = h1 + h2
                    if jsonl:
                        for rec in [*torch_recs.values(), *crate_recs.values()]:
                            jsonl.write(json.dumps(rec) + "\n")
                        jsonl.flush()
                    t, c, tc = torch_recs.get(what), crate_recs.get(what), torch_recs.get("cached_decode")
                    if c is not None and c.get("precision", "fp32") != args.precision:
                        sys.exit(f"the crate reported precision {c.get('precision')!r}, not {args.precision!r}")
                    rounds.append((t and t["median_ms"], c and c["median_ms"], c and c["gflops"],
                                   tc and tc["median_ms"]))
                torch_ms, crate_ms, gflops, cached_ms = (median([r[i] for r in rounds]) for i in range(4))
                row = dict(workload=wl, threads=th, what=what, torch=torch_ms, crate=crate_ms,
                           crate_gflops=gflops, torch_cached=cached_ms)
                # Speed-ups pair each round's PyTorch with the crate right after it.
                ups = [ratio(r[0], r[1]) for r in rounds]
                ups_cached = [ratio(r[3], r[1]) for r in rounds]
                row["speedup"], row["speedup_range"] = median(ups), spread(ups)
                row["speedup_cached"], row["speedup_cached_range"] = median(ups_cached), spread(ups_cached)
                row["of_peak"] = ratio(row["crate_gflops"], peak.get(th))
                rows.append(row)
                line = (f"{wl:>8} {th:>3} {what:<14} {fmt(row['torch'], '10.2f')} {fmt(row['crate'], '10.2f')} "
                        f"{fmt(row['speedup'], '8.2f')}x {fmt(row['crate_gflops'], '14.1f')} "
                        f"{fmt(row['of_peak'] and 100 * row['of_peak'], '7.1f')}%")
                if what == "greedy_decode":
                    line += f"             {fmt(row['torch_cached'], '15.2f')} {fmt(row['speedup_cached'], '8.2f')}x"
                if args.rounds > 1:
                    line += f"   speed-ups over {args.rounds} rounds: {row['speedup_range']}"
                    if what == "greedy_decode":
                        line += f", cached {row['speedup_cached_range']}"
                print(line, flush=True)
    if jsonl:
        jsonl.close()
    if args.markdown:
        Path(args.markdown).write_text(markdown(args, rows, headers, peak))
        print(f"wrote {args.markdown}")


def steps_for(args, workload):
    """Measured repetitions for `workload`: `--steps` (halved for base, at least 3), or by default 100
    for tiny, 10 for small and 5 for base."""
    if args.steps is None:
        return {"tiny": 100, "small": 10, "base": 5}[workload]
    return max(3, args.steps // 2) if workload == "base" else args.steps


def markdown(args, rows, headers, peak):
    """The results as Markdown: setup, one detailed table, one table of speed-ups."""
    rounds = (f" {args.rounds} rounds: each PyTorch process followed by the crate's, the pair run {args.rounds} "
              "times in turn; milliseconds are the medians over the rounds, speed-ups the median of the rounds' "
              "speed-ups, their range in brackets." if args.rounds > 1 else "")
    batch = (f"batch {args.batch} on both sides instead of each workload's (not the reference workloads); "
             if args.batch is not None else "")
    out = [f"Machine: {cpu_name()}, {os.cpu_count()} logical CPUs; precision {args.precision}; {batch}"
           "medians over " + ", ".join(f"{steps_for(args, wl)} measured repetitions for {wl}" for wl in args.workloads) +
           " after "
           f"{args.warmup} warm-up, seed {args.seed}. Speed-up = PyTorch's median / the crate's (above 1 the crate is "
           "faster)." + rounds + (" FMA peak " + " / ".join(f"{p:g}" for p in peak.values()) +
                                  f" GFLOP/s at {' / '.join(str(k) for k in peak)} threads." if peak else ""), ""]
    out += [f"    {h}" for h in headers] + [""]
    out += ["| workload | threads | measurement | PyTorch ms | vaswani ms | speed-up | vaswani GFLOP/s | of FMA peak |",
            "|---|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        cells = [(NAMES[r["what"]] + (" (PyTorch: nn.Transformer, no cache)" if r["what"] == "greedy_decode" else ""),
                  r["torch"], r["speedup"])]
        if r["what"] == "greedy_decode":
            cells.append(("greedy decode (PyTorch: hand-written key/value cache)", r["torch_cached"], r["speedup_cached"]))
        for name, torch_ms, speedup in cells:
            out.append(f"| {r['workload']} | {r['threads']} | {name} | {fmt(torch_ms, '.2f')} | {fmt(r['crate'], '.2f')} | "
                       f"{times(speedup)} | {fmt(r['crate_gflops'], '.1f')} | "
                       f"{fmt(r['of_peak'] and 100 * r['of_peak'], '.0f')}{'%' if r['of_peak'] else ''} |")
    # Speed-ups only, one row per workload and thread count.
    cols = [w for w in MEASUREMENTS if w in args.what]
    head = [NAMES[w] if w != "greedy_decode" else "greedy decode vs nn.Transformer" for w in cols]
    if "greedy_decode" in cols:
        head.append("greedy decode vs cached PyTorch")
    out += ["", "| workload | threads | " + " | ".join(head) + " |", "|---|---:|" + "---:|" * len(head)]
    by_key = {(r["workload"], r["threads"], r["what"]): r for r in rows}
    for wl in args.workloads:
        for th in args.threads:
            def cell(r, key):
                return times(r[key]) + (f" ({r[key + '_range']})" if args.rounds > 1 else "")
            cells = [cell(by_key[(wl, th, w)], "speedup") for w in cols]
            if "greedy_decode" in cols:
                cells.append(cell(by_key[(wl, th, "greedy_decode")], "speedup_cached"))
            out.append(f"| {wl} | {th} | " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
