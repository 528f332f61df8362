"""Turn a pytest-benchmark JSON file into a markdown table (median time and the throughput in extra_info).

    python benchmarks/summarize.py results/benchmarks.json
"""
import json
import sys


def main(path: str) -> None:
    with open(path) as f:
        data = json.load(f)
    rows = data.get("benchmarks", [])
    if not rows:
        print("no benchmarks in", path)
        return
    env = rows[0].get("extra_info", {})
    print(f"device: {env.get('device_name')}  torch {env.get('torch')}  triton {env.get('triton')}  "
          f"date {data.get('datetime', '')[:10]}\n")
    keys = ["tflops", "gbps", "peak_mem_mb", "ortho_error"]
    print("| benchmark | median ms | " + " | ".join(keys) + " |")
    print("|---|---|" + "---|" * len(keys))
    for b in rows:
        ex = b.get("extra_info", {})
        vals = [f"{ex[k]:.3g}" if isinstance(ex.get(k), (int, float)) else "" for k in keys]
        print(f"| {b['name']} | {b['stats']['median'] * 1e3:.3f} | " + " | ".join(vals) + " |")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks.json")
