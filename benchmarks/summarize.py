"""Turn pytest-benchmark JSON files into markdown tables: median time and the figures in extra_info.

    python benchmarks/summarize.py results/attention.json results/logit_laplace.json ...

One table per benchmark function (``test_attention``, ``test_logit_laplace``, ...), with only the columns its
benchmarks wrote. The figures are the ``extra_info`` keys the files under ``benchmarks/`` record:
``tflops`` (useful TFLOP/s), ``gbps`` (GB/s), ``peak_mem_mb`` (GPU), ``max_err`` / ``loss_rel_err`` /
``ortho_error`` / ``grad_max_err`` (accuracy against a float64 reference), ``compression`` (PowerSGD).
"""
import argparse
import json
import sys
from pathlib import Path

FIGURES = ["tflops", "gbps", "peak_mem_mb", "max_err", "loss_rel_err", "ortho_error", "grad_max_err", "compression"]
ENV_KEYS = ["device_name", "torch", "triton", "cuda", "dalle_kernels", "cuda_extension"]


def fmt(x) -> str:
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return "" if x is None else str(x)
    return f"{x:.3g}"


def load(paths):
    rows, headers = [], []
    for path in paths:
        with open(path) as f:
            data = json.load(f)
        bench = data.get("benchmarks", [])
        if not bench:
            headers.append(f"{path}: no benchmarks")
            continue
        env = bench[0].get("extra_info", {})
        headers.append(f"{path}: " + "  ".join(f"{k} {env[k]}" for k in ENV_KEYS if k in env)
                       + f"  date {data.get('datetime', '')[:10]}")
        rows.extend(bench)
    return rows, headers


def tables(rows) -> str:
    groups = {}
    for b in rows:
        groups.setdefault(b["name"].split("[")[0], []).append(b)
    out = []
    for name, bench in groups.items():
        keys = [k for k in FIGURES if any(k in b.get("extra_info", {}) for b in bench)]
        out.append(f"### {name}\n")
        out.append("| benchmark | median ms | rounds | " + " | ".join(keys) + " |")
        out.append("|---|---|---|" + "---|" * len(keys))
        for b in bench:
            ex = b.get("extra_info", {})
            params = b["name"][len(name):].strip("[]") or name
            stats = b.get("stats") or {}
            median = f"{stats['median'] * 1e3:.3f}" if "median" in stats else ""
            out.append(f"| {params} | {median} | {stats.get('rounds', '')} | "
                       + " | ".join(fmt(ex.get(k)) for k in keys) + " |")
        out.append("")
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python benchmarks/summarize.py", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="*", default=["benchmarks.json"], metavar="FILE.json",
                   help="pytest-benchmark JSON files (written by --benchmark-json); default: benchmarks.json")
    return p


def main(argv=None) -> None:
    """Print the tables; a missing or unreadable file is a usage error (exit status 2), not a traceback."""
    p = build_parser()
    paths = p.parse_args(argv).paths
    for path in paths:
        if not Path(path).is_file():
            p.error(f"argument FILE.json: no such file: {path!r}")
    try:
        rows, headers = load(paths)
        text = tables(rows) if rows else ""
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # JSON that is not pytest-benchmark's
        p.error(f"argument FILE.json: not a pytest-benchmark JSON file ({type(e).__name__}: {e})")
    print("\n".join(headers) + "\n")
    if text:
        print(text)


if __name__ == "__main__":
    main()
