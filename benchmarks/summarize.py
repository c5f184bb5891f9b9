"""Markdown tables from a pytest-benchmark JSON file, one table per benchmark group.

    python benchmarks/summarize.py benchmarks/results/cpu-2core.json [more.json ...]

Sinkhorn groups: time is the fastest round (``min``); "vs geomloss" is the time of the
fastest geomloss backend of the same group divided by the row's time (> 1: faster than
geomloss); "cpu s" the process CPU time of that call (both threads); "load" the 1-minute
load average when it started (the machine may be shared); "rel diff" |value − ref| / |ref|
and "grad rel diff" ‖∇ − ∇ref‖ / ‖∇ref‖ against geomloss tensorized (float64 for N ≤ 1000,
else float32).  Memory groups: peak RSS of a fresh process running one forward+backward.
"""
import json
import sys


def fmt_time(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def fmt_rel(r):
    return "" if r is None else f"{r:.1e}"


def competitor(b):
    e = b.get("extra_info", {})
    name = f"{e['lib']} {e['backend']}" if "lib" in e else b["name"]
    if e.get("auto_selects"):
        name += f" (→ {e['auto_selects']})"
    return name


def sinkhorn_table(rows):
    geo = [b["stats"]["min"] for b in rows if b.get("extra_info", {}).get("lib") == "geomloss"]
    best = min(geo) if geo else None
    out = ["| competitor | time | vs geomloss | rounds | cpu s | load | value | rel diff | grad rel diff |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in sorted(rows, key=lambda b: b["stats"]["min"]):
        e, t = b.get("extra_info", {}), b["stats"]["min"]
        speed = f"{best / t:.2f}×" if best else "n/a"
        value = f"{e['value']:.7g}" if "value" in e else ""
        cpu = f"{e['cpu_s']:.1f}" if "cpu_s" in e else ""
        rel, grel = fmt_rel(e.get("rel_diff")), fmt_rel(e.get("grad_rel_diff"))
        if e.get("ref") == f"{competitor(b)} {e.get('dtype')}":  # compared with itself
            rel = grel = "(reference)"
        out.append(f"| {competitor(b)} | {fmt_time(t)} | {speed} | {b['stats']['rounds']} | {cpu} "
                   f"| {e.get('loadavg_1min', '')} | {value} | {rel} | {grel} |")
    if best is None:
        out.append("\n(no geomloss competitor ran in this group)")
    return out


def memory_table(rows):
    out = ["| backend | N=M | D | ε-scaling | cost cached | peak RSS (VmHWM) | RSS before solve | peak − before | solve time | total (with start) | value |",
           "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"].get("backend", ""), b["extra_info"].get("N", 0))):
        e = b["extra_info"]
        out.append(f"| {e['backend']} | {e['N']} | {e['D']} | {e.get('scaling', 0.5)} | {e['cost_cached']} "
                   f"| {e['peak_rss_mb']:.0f} MB | {e['rss_before_kb'] / 1024:.0f} MB "
                   f"| {e['peak_rss_mb'] - e['rss_before_kb'] / 1024:.0f} MB "
                   f"| {fmt_time(e['seconds'])} | {fmt_time(b['stats']['min'])} | {e['value']:.7g} |")
    return out


def _fmt_extra(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def generic_table(rows):
    """Any other group: time, speed relative to the slowest row of the group, and the scalar
    ``extra_info`` fields the rows record (values, rates, errors)."""
    keys = []
    for b in rows:
        for k, v in b.get("extra_info", {}).items():
            if isinstance(v, (int, float, str, bool)) and k not in keys:
                keys.append(k)
    slowest = max(b["stats"]["min"] for b in rows)
    extra = "".join(f" {k} |" for k in keys)
    out = ["| benchmark | time (min) | vs slowest | rounds |" + extra,
           "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for b in sorted(rows, key=lambda b: b["stats"]["min"]):
        e, t = b.get("extra_info", {}), b["stats"]["min"]
        cells = [_fmt_extra(e[k]) if k in e else "" for k in keys]
        out.append(f"| {b['name']} | {fmt_time(t)} | {slowest / t:.2f}× | {b['stats']['rounds']} |"
                   + "".join(f" {c} |" for c in cells))
    return out


def summarize(path):
    with open(path) as fh:
        data = json.load(fh)
    m, c = data.get("machine_info", {}), data.get("commit_info", {})
    lines = [f"### {path}", "",
             f"{m.get('cpu', {}).get('brand_raw', m.get('processor', '?'))}, {m.get('cpu_count')} cores, "
             f"torch {m.get('torch')} ({m.get('torch_threads')} threads), geomloss {m.get('geomloss')}, "
             f"{m.get('keops')}; commit {c.get('id', '?')[:10]}{' (dirty)' if c.get('dirty') else ''}, "
             f"{data.get('datetime', '')[:19]}", ""]
    groups = {}
    for b in data["benchmarks"]:
        groups.setdefault(b.get("group") or b["name"], []).append(b)
    for group in sorted(groups, key=_group_key):
        rows = groups[group]
        lines += [f"**{group}**", ""]
        if all({"peak_rss_mb", "cost_cached"} <= set(b.get("extra_info", {})) for b in rows):  # bench_memory
            lines += memory_table(rows)
        elif all("lib" in b.get("extra_info", {}) for b in rows):
            lines += sinkhorn_table(rows)
        else:  # another module's benchmarks
            lines += generic_table(rows)
        lines.append("")
    return "\n".join(lines)


def _group_key(g):
    """'sinkhorn N=10000 D=3' sorts by (kind, N, D) numerically."""
    parts = g.split() or [""]
    nums = [int(p.split("=")[1]) for p in parts if "=" in p and p.split("=")[1].isdigit()]
    return (parts[0], nums, g)


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    print("\n".join(summarize(p) for p in sys.argv[1:]))
