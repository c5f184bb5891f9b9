"""Markdown tables from a pytest-benchmark JSON file, one table per benchmark group.

    python benchmarks/summarize.py benchmarks/results/cpu-2core.json [more.json ...]

Times are the **median** of a benchmark's rounds (``common.Rounds``: every competitor of a
group runs under the same warm-up and rounds; "rule" says which).  Sinkhorn groups: "vs
geomloss" is the time of the fastest geomloss backend of the same group divided by the row's
time (> 1: faster than geomloss); "cpu s" the process CPU time of that call (both threads); "load" the 1-minute
load average when it started (the machine may be shared); "rel diff" |value − ref| / |ref|
and "grad rel diff" ‖∇ − ∇ref‖ / ‖∇ref‖ against geomloss tensorized (float64 for N ≤ 1000,
else float32).  Memory groups: peak RSS of a fresh process running one forward+backward, what
its cost handles stored, and the value against geomloss float64.  Other groups: when a row is
marked ``role: reference`` (the group's baseline), "vs reference" is its time divided by each
row's time; otherwise "vs slowest".
"""
import json
import sys


def fmt_time(s):
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def t_of(b):
    """A benchmark's figure: the median of its rounds."""
    return b["stats"]["median"]


def rule_of(b):
    e = b.get("extra_info", {})
    if "warmup_rounds" in e:
        return f"w{e['warmup_rounds']}+{e['rounds']}"
    return f"{b['stats']['rounds']} (rule not recorded)"


def fmt_rel(r):
    return "" if r is None else f"{r:.1e}"


def competitor(b):
    e = b.get("extra_info", {})
    name = f"{e['lib']} {e['backend']}" if "lib" in e else b["name"]
    if e.get("auto_selects"):
        name += f" (→ {e['auto_selects']})"
    return name


def sinkhorn_table(rows):
    geo = [t_of(b) for b in rows if b.get("extra_info", {}).get("lib") == "geomloss"]
    best = min(geo) if geo else None
    out = ["| competitor | time (median) | vs geomloss | rule | cpu s | load | value | rel diff | grad rel diff |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for b in sorted(rows, key=t_of):
        e, t = b.get("extra_info", {}), t_of(b)
        speed = f"{best / t:.2f}×" if best else "n/a"
        value = f"{e['value']:.7g}" if "value" in e else ""
        cpu = f"{e['cpu_s']:.1f}" if "cpu_s" in e else ""
        rel, grel = fmt_rel(e.get("rel_diff")), fmt_rel(e.get("grad_rel_diff"))
        if e.get("ref") == f"{competitor(b)} {e.get('dtype')}":  # compared with itself
            rel = grel = "(reference)"
        out.append(f"| {competitor(b)} | {fmt_time(t)} | {speed} | {rule_of(b)} | {cpu} "
                   f"| {e.get('loadavg_1min', '')} | {value} | {rel} | {grel} |")
    if best is None:
        out.append("\n(no geomloss competitor ran in this group)")
    return out


def memory_table(rows):
    out = ["| case | N=M | D | ε-scaling | cache budget | what the cost handles stored | peak RSS (VmHWM) "
           "| RSS before solve | growth | solve time | total (with start) | value | rel diff vs geomloss float64 |",
           "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in sorted(rows, key=lambda b: (b["extra_info"].get("N", 0), b["name"])):
        e = b["extra_info"]
        stored = e.get("cache_report", "")
        stored = stored.split(";")[-2].strip() if stored.count(";") >= 2 else "no report"
        case = b["name"].split("[")[-1].rstrip("]")
        out.append(f"| {case} | {e['N']} | {e['D']} | {e.get('scaling', 0.5)} | {e.get('cache_budget', '')} "
                   f"| {stored} "
                   f"| {e['peak_rss_mb']:.0f} MB | {e['rss_before_kb'] / 1024:.0f} MB "
                   f"| {e['peak_rss_mb'] - e['rss_before_kb'] / 1024:.0f} MB "
                   f"| {fmt_time(e['seconds'])} | {fmt_time(t_of(b))} | {e['value']:.7g} "
                   f"| {fmt_rel(e.get('rel_diff')) or 'not checked'} |")
    return out


def _fmt_extra(v):
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def generic_table(rows):
    """Any other group: time (median), speed relative to the group's reference row (``role:
    reference``) or else to its slowest row, the rule, and the scalar ``extra_info`` fields the
    rows record (values, rates, errors)."""
    skip = {"warmup_rounds", "rounds", "statistic", "role"}
    keys = []
    for b in rows:
        for k, v in b.get("extra_info", {}).items():
            if isinstance(v, (int, float, str, bool)) and k not in keys and k not in skip:
                keys.append(k)
    refs = [t_of(b) for b in rows if b.get("extra_info", {}).get("role") == "reference"]
    base, label = (refs[0], "vs reference") if refs else (max(t_of(b) for b in rows), "vs slowest")
    extra = "".join(f" {k} |" for k in keys)
    out = [f"| benchmark | time (median) | {label} | rule |" + extra,
           "|---|---:|---:|---:|" + "---:|" * len(keys)]
    for b in sorted(rows, key=t_of):
        e, t = b.get("extra_info", {}), t_of(b)
        cells = [_fmt_extra(e[k]) if k in e else "" for k in keys]
        name = b["name"] + (" (reference)" if e.get("role") == "reference" else "")
        out.append(f"| {name} | {fmt_time(t)} | {base / t:.2f}× | {rule_of(b)} |"
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
