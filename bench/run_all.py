"""Run every benchmark (each in its own process), then print one markdown table.

    python -m bench.run_all                 # make bench: ViT-B/16 shapes on CPU (tens of minutes)
    python -m bench.run_all --quick         # make bench-quick: tiny sizes, for CI (figures meaningless)
    python -m bench.run_all --device cuda   # the same on a GPU
    python -m bench.run_all --report        # only print the table of bench/results/*.json

Results: bench/results/<name>.json (schema in bench/common.py) and bench/results/summary.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.common import RESULTS_DIR, markdown_table

BENCHMARKS = ("extraction", "training", "evaluation", "store", "memory", "learning", "study")


def machine_line(results: list[dict]) -> str:
    if not results:
        return ""
    m = results[0]["machine"]
    device = m["device"] if "gpu" not in m else f"{m['device']} ({m['gpu']})"
    return (
        f"Machine: {m['cores']} cores ({m['cpu_model']}), {m['memory_gib']} GiB RAM, "
        f"torch {m['torch']} ({m['torch_threads']} threads), device {device}; "
        f"load average at start {', '.join(f'{x:.1f}' for x in m['load_average_at_start'] or [])}."
    )


def report(out: Path, names: list[str]) -> str:
    results = []
    for name in names:
        path = out / f"{name}.json"
        if path.exists():
            results.append(json.loads(path.read_text()))
    lines = [markdown_table(results), "", machine_line(results)]
    for res in results:
        lines += [f"- {res['name']}: {note}" for note in res["notes"]]
    return "\n".join(lines)


def run_benchmark(name: str, device: str, out: Path, quick: bool) -> int:
    """`python -m bench.<name>` in its own process; its exit code."""
    cmd = [sys.executable, "-m", f"bench.{name}", "--device", device, "--out", str(out)]
    if quick:
        cmd.append("--quick")
    print(f"== {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent).returncode
    print(f"== {name}: exit {code} after {time.perf_counter() - start:.0f} s", flush=True)
    return code


def write_summary(out: Path, table: str, quick: bool, device: str) -> None:
    """bench/results/summary.md: the command that made the results, then their table."""
    command = "python -m bench.run_all" + (" --quick" if quick else "")
    if device != "cpu":
        command += f" --device {device}"
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.md").write_text(f"Command: `{command}`\n\n{table}\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.run_all", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes, for CI")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=str(RESULTS_DIR))
    p.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmarks")
    p.add_argument("--report", action="store_true", help="print the table of existing results")
    args = p.parse_args(argv)
    out = Path(args.out)
    names = [n for n in args.only.split(",") if n]
    unknown = set(names) - set(BENCHMARKS)
    if unknown:
        p.error(f"unknown benchmark(s) {', '.join(sorted(unknown))}; choose from {BENCHMARKS}")
    failed = []
    if not args.report:
        failed = [n for n in names if run_benchmark(n, args.device, out, args.quick) != 0]
    table = report(out, [n for n in names if n not in failed])
    if not args.report:
        write_summary(out, table, args.quick, args.device)
    print(f"\n{table}")
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
