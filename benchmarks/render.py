"""Render the tables of docs/benchmarks.md from the committed JSON in benchmarks/results/.

    .venv/bin/python benchmarks/render.py            # rewrite the marked blocks of docs/benchmarks.md
    .venv/bin/python benchmarks/render.py --check    # exit 1 if the page differs from the JSON

The page marks each generated block:

    <!-- render:NAME -->
    ... generated from benchmarks/results/NAME.json, never edited by hand ...
    <!-- /render:NAME -->

A block whose JSON file does not exist yet is left as it is (it says how to produce it). The renderer is
picked by the file's "kind" (see record.py), so e.g. sweep_overhead.json and sweep_overhead_short.json
share one. Text outside the markers (how to read the numbers) is written by hand.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "benchmarks.md"
RESULTS_DIR = ROOT / "benchmarks" / "results"
BLOCK = re.compile(r"(<!-- render:(?P<name>[\w.-]+) -->\n)(?P<body>.*?)(<!-- /render:(?P=name) -->)", re.S)


def provenance(p: dict[str, Any]) -> str:
    m = p.get("machine", {})
    load = "{:.1f} before, {:.1f} after".format(p["load_average_before"][0], p["load_average_after"][0])
    torch = f", torch {m['torch']}" if m.get("torch") else ""
    gpu = f", GPU {m['cuda_device']}" if m.get("cuda_device") else ""
    simd = f" with {m['simd']}" if m.get("simd") else ""
    return (
        f"*Measured {p['started_utc']} on {m.get('cpu_model')}{simd} ({m.get('usable_cpus')} usable of "
        f"{m.get('logical_cpus')} CPUs, {m.get('memory_gib')} GiB{gpu}), "
        f"Python {m.get('python')}{torch}; "
        f"1-minute load average {load}; commit {p.get('git_commit') or 'unknown'}; "
        f"`{p.get('command')}`.*"
    )


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def render_models(p: dict[str, Any]) -> str:
    r = p["results"]
    steps = r["steps"]
    ln = {
        s["hidden_size"]: s["cpu_ms"]
        for s in steps
        if s["model"] == "ln_lstm" and s["options"] == "cell_form=fused"
    }
    rows = []
    for s in steps:
        rss = "n/a" if s["rss_peak_mb"] is None else f"{s['rss_peak_mb']:.1f}"
        vs_ln = f"{s['cpu_ms'] / ln[s['hidden_size']]:.2f}" if s["hidden_size"] in ln else "-"
        rows.append(
            [
                s["hidden_size"],
                s["model"],
                s["options"],
                s["num_params"],
                f"{s['cpu_ms']:.1f}",
                f"{s['wall_ms']:.1f}",
                f"{s['sequences_per_s']:.0f}",
                vs_ln,
                f"{s['gflop']:.3f}",
                f"{s['cpu_ms'] / s['flop_limit_ms']:.2f}",
                f"{s['tensor_peak_mb']:.1f}",
                rss,
            ]
        )
    header = [
        "H",
        "model",
        "options",
        "params",
        "CPU ms",
        "wall ms",
        "seq/s",
        "vs LN-LSTM (fused)",
        "GFLOP",
        "vs FLOP limit",
        "tensor MiB",
        "RSS MiB",
    ]
    steps_table = table(header, rows)
    by_library = r.get("matmul_gflops_by_library") or {  # results from before oneDNN: torch.mm's only
        h: {"torch.mm": shapes} for h, shapes in r["matmul_gflops"].items()}
    first = next(iter(by_library.values()))
    rates = table(
        ["H", "library", *next(iter(first.values())).keys()],
        [[h, library, *(f"{v:.1f}" for v in shapes.values())]
         for h, libraries in by_library.items() for library, shapes in libraries.items()],
    )
    targets = table(
        ["target", "measured", "limit", "met?"],
        [
            [
                t["target"],
                f"{t['value']:.2f}x ({t['detail']})",
                f"<= {t['limit']}x",
                "yes" if t["met"] else "**no**",
            ]
            for t in r["targets"]
        ],
    )
    rates_note = (
        "Matmul rate (GFLOP/s, one thread) at the step's shapes, measured in the same process; "
        "the FLOP limit uses the best of torch.mm's (the column `vs FLOP limit` too), the second target row "
        "the best of all:"
    )
    return "\n\n".join([provenance(p), targets, steps_table, rates_note, rates])


def render_fw_ln_bound(p: dict[str, Any]) -> str:
    rows = []
    for r in p["results"]:
        parts, steps = r["parts_ms"], r["step_ms"]
        rows.append([r["hidden"], f"{steps['ln_lstm']:.2f}", f"{steps['fw_lstm']:.2f}",
                     f"{r['over_ln_lstm']['fw_lstm']:.2f}", f"{parts['rest over the LN-LSTM']:.2f}",
                     f"{parts['memory traffic beyond L2']:.2f}", f"{parts['products (memory in L2)']:.2f}",
                     f"{parts['products at the L2 floor']:.2f}", f"{r['floor_ms']:.2f}",
                     f"{r['floor_over_ln_lstm']:.2f}", f"{r['target_ms']:.2f}",
                     f"{r['rows_per_block']}", f"{r['l2_read_gb_s']:.0f}"])
    header = ["H", "LN-LSTM ms", "FW-LSTM ms", "FW/LN (paired)", "rest over LN ms", "memory traffic ms",
              "products ms", "products at L2 floor ms", "floor ms", "floor/LN", "target ms (1.3 LN)",
              "rows per block", "L2 read GB/s"]
    return provenance(p) + "\n\n" + table(header, rows)


def render_sweep_overhead(p: dict[str, Any]) -> str:
    r = p["results"]
    rows = [
        [
            "trials",
            f"{r['trials']} x {r['epochs']} epochs of {r['steps_per_epoch']} steps "
            f"(ART K={r['pairs']}), {r['concurrent']} at a time on {r['cores']} cores, "
            f"{r['server']} MLflow server",
        ],
        ["sum of training time", f"{r['train_s']:.1f} s ({r['train_s_per_trial']:.2f} s per trial)"],
        ["wall (whole `run_sweep`)", f"{r['wall_s']:.1f} s"],
        ["**core utilisation, whole run**", f"**{r['utilisation']:.3f}**"],
        ["**overhead per trial**", f"**{r['overhead_core_s_per_trial']:.2f} core-s**"],
        [
            "Tune phase (first trial start to last trial end)",
            f"{r['tune_wall_s']:.1f} s: utilisation {r['tune_utilisation']:.3f}, "
            f"{r['tune_overhead_core_s_per_trial']:.2f} core-s per trial",
        ],
        ["fixed start/stop cost", f"{r['fixed_cost_s']:.1f} s"],
    ]
    if "driver_cpu_s" in r:
        rows.append(["the driver process's own CPU (user + system, all its threads)",
                     f"{r['driver_cpu_s']:.1f} s ({r['driver_cpu_s_per_trial']:.2f} s per trial)"])
    return provenance(p) + "\n\n" + table(["measure", "value"], rows)


def _sweep_cells(run: dict[str, Any]) -> list[str]:
    """driver CPU s, core utilisation, overhead core-s per trial, Tune phase s (utilisation), fixed s."""
    return [f"{run['driver_cpu_s']:.1f}", f"{run['utilisation']:.3f}",
            f"{run['overhead_core_s_per_trial']:.2f}",
            f"{run['tune_wall_s']:.1f} ({run['tune_utilisation']:.3f})", f"{run['fixed_cost_s']:.1f}"]


SWEEP_COLUMNS = ["driver CPU s", "core utilisation", "overhead core-s per trial",
                 "Tune phase s (its utilisation)", "fixed start/stop s"]


def _short_sweep(r: dict[str, Any]) -> str:
    first = r["runs"][0]
    return (f"{r['trials']} trials x {first['epochs']} epoch of {first['steps_per_epoch']} steps (ART "
            f"K={first['pairs']}), {first['concurrent']} at a time on {first['cores']} cores, "
            f"{first['server']} MLflow server")


def render_sweep_snapshots(p: dict[str, Any]) -> str:
    r = p["results"]
    labels = {"tune": "Tune's rules: every 2 s, forced per `num_to_keep` checkpoints (before)",
              "paced": "paced: every 2 s or 19x a snapshot's time, none forced (sweep/tune_snapshots.py)"}
    rows = [[labels.get(run["snapshot_rules"], run["snapshot_rules"]), f"{run['wall_s']:.1f}",
             str(run["snapshots"]), f"{run['snapshot_s']:.1f}", *_sweep_cells(run)] for run in r["runs"]]
    head = f"{_short_sweep(r)}, `keep_checkpoints: 1`; the two in turn in one process."
    return provenance(p) + "\n\n" + head + "\n\n" + table(
        ["experiment-state snapshots", "wall s", "snapshots", "in snapshots s", *SWEEP_COLUMNS], rows)


def render_sweep_against(p: dict[str, Any]) -> str:
    r = p["results"]
    rows = [[run["package"], f"{run['wall_s']:.1f}", *_sweep_cells(run)] for run in r["runs"]]
    head = (f"{_short_sweep(r)}; the `sweep` package of {r['against'][:7]}, then this checkout's, each in a "
            "fresh process.")
    return provenance(p) + "\n\n" + head + "\n\n" + table(["package", "wall s", *SWEEP_COLUMNS], rows)


def render_fixed_cost(p: dict[str, Any]) -> str:
    r = p["results"]
    parts, rows = [], []
    for store, m in r["mlflow_server"].items():
        cpu = ", ".join(f"{name} {s:.1f}" for name, s in m["cpu_s"].items())
        rows.append([f"local MLflow server, {store}",
                     f"{m['ready_s']:.1f} s to /health; stop {m['stop_s']:.1f} s",
                     f"{sum(m['cpu_s'].values()):.1f} ({cpu})"])
    ray = r["ray"]
    ray_cpu = ", ".join(f"{name} {s:.1f}" for name, s in sorted(ray["cpu_s"].items(), key=lambda kv: -kv[1]))
    rows.append(["local Ray (`ray.init`)", f"{ray['init_s']:.1f} s; stop {ray['shutdown_s']:.1f} s",
                 f"{sum(ray['cpu_s'].values()):.1f} ({ray_cpu})"])
    for name, m in r["imports"].items():
        rows.append([name, f"{m['wall_s']:.2f} s", f"{m['cpu_s']:.2f}"])
    parts.append(table(["part (each alone)", "wall", "CPU seconds"], rows))
    sweep = r["sweep"]
    parts.append(f"One sweep of {sweep['trials']} short trials (2 at a time), seconds from the start of "
                 "`run_sweep`:")
    parts.append(table(["s", "event"], [[f"{t:.1f}", what] for t, what in sweep["marks"]]))
    return "\n\n".join([provenance(p), *parts])


def render_allocator(p: dict[str, Any]) -> str:
    rows = [[r["hidden_size"], r["model"], r["options"], f"{r['ms_default']:.1f}", f"{r['ms_kept']:.1f}",
             f"{r['ratio']:.2f}", f"{r['faults_default']:.0f}", f"{r['faults_kept']:.0f}"]
            for r in p["results"]["rows"]]
    header = ["H", "model", "options", "ms, glibc's defaults", "ms, as trials run", "ratio",
              "page faults per step, defaults", "page faults per step, as trials run"]
    return "\n\n".join([provenance(p), table(header, rows)])


def render_kernels_ab(p: dict[str, Any]) -> str:
    r = p["results"]
    rows = [[row["hidden_size"], row["model"], f"{row['base_ms']:.2f}", f"{row['new_ms']:.2f}",
             f"{row['ratio']:.3f}", f"{row['ratio_min']:.2f}-{row['ratio_max']:.2f}"] for row in r["rows"]]
    header = ["H", "model", f"base ({r['base_commit'][:7]}) ms", "this commit ms", "this / base (median)",
              "range over rounds"]
    return "\n\n".join([provenance(p), table(header, rows)])


def seed_ranges(seeds: list[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'"""
    spans: list[list[int]] = []
    for seed in sorted(seeds):
        if spans and seed == spans[-1][1] + 1:
            spans[-1][1] = seed
        else:
            spans.append([seed, seed])
    return ", ".join(f"{a}-{b}" if b > a else str(a) for a, b in spans)


def render_search_efficiency(p: dict[str, Any]) -> str:
    r = p["results"]
    rows = []
    for name, seeds in r["strategies"].items():
        reached = [s["epochs_to_target"] for s in seeds if s["epochs_to_target"] is not None]
        rows.append(
            [
                name,
                ", ".join(str(s["epochs_to_target"]) for s in seeds),
                f"{len(reached)} of {len(seeds)}",
                statistics.median(s["total_epochs"] for s in seeds),
                statistics.median(s.get("trials", r["trials"]) for s in seeds),
                f"{statistics.median(s['best'] for s in seeds):.3f}",
            ]
        )
    header = [
        "strategy",
        f"epochs to {r['target']:.0%} (per seed)",
        "reached",
        "total trial-epochs (median)",
        f"trials of {r['trials']} started (median)",
        "best val acc (median)",
    ]
    out = provenance(p)
    if r.get("earlier_runs"):  # one table over several sittings (`--extend`): each one's provenance
        runs = [*r["earlier_runs"], {**p, "seeds": r["seeds_this_run"]}]
        out = "\n\n".join(f"Seeds {seed_ranges(run['seeds'])}: {provenance(run)}" for run in runs)
    if r.get("paired_with"):
        src = r["paired_with"]
        out += (f"\n\nrandom+fifo: the same seeds' searches from `{src['file']}` (commits "
                f"{', '.join(c[:7] for c in src['git_commits'])}), not run again: random+fifo does not "
                f"depend on ASHA's settings. ASHA's bootstrap_count: {r.get('bootstrap_count', 0)}.")
    out += "\n\n" + table(header, rows)
    eff = r.get("efficiency")
    if eff:
        ci = f", 95% CI {eff['ci_low']:.3f}-{eff['ci_high']:.3f}" if "ci_low" in eff else ""  # near 1/3
        out += (f"\n\n**tpe+asha / random+fifo, mean trial-epochs to {r['target']:.0%}: {eff['ratio']:.3f}**"
                f"{ci} (paired by seed over {eff['seeds']} seeds, bootstrap; a search that never reached "
                f"it counts {eff['censored_at']} epochs). Target: <= 1/3 (0.333).")
    return out


def render_tracking(p: dict[str, Any]) -> str:
    r = p["results"]
    times = r["seconds_per_report"]

    def ms(xs: list[float]) -> list[str]:
        return [f"{1e3 * statistics.median(xs):.1f}", f"{1e3 * sorted(xs)[int(0.9 * len(xs))]:.1f}"]

    rows = [
        ["stock (one request per metric)", *ms(times["stock"])],
        ["fwsweep (one log_batch)", *ms(times["fwsweep"])],
        ["fwsweep, server unreachable", *ms(times["fwsweep_server_down"])],
    ]
    ratio = statistics.median(times["stock"]) / statistics.median(times["fwsweep"])
    return (
        provenance(p)
        + "\n\n"
        + table(["logger", "median ms per report", "p90 ms"], rows)
        + f"\n\n{r['reports']} reports of {r['fields']} fields; stock / fwsweep (median): {ratio:.1f}x"
    )


def render_gpu(p: dict[str, Any]) -> str:
    r = p["results"]
    def graphed(s: dict[str, Any]) -> bool:
        return "cuda_graph=on" in s["options"]

    ln_ms = {  # the LN-LSTM (fused) at each point, eager and graphed: each row is compared with its like
        (s["hidden_size"], s["batch"], s["length"], graphed(s)): s["ms"]
        for s in r["steps"]
        if s["model"] == "ln_lstm" and s["options"].startswith("cell_form=fused")
    }

    def vs_ln(s: dict[str, Any]) -> str:
        ln = ln_ms.get((s["hidden_size"], s["batch"], s["length"], graphed(s)))
        return f"{s['ms'] / ln:.2f}" if ln else "-"

    steps = table(
        ["H", "B", "T", "model", "options", "ms per step", "host ms", "kernels",
         "vs LN-LSTM (fused, same graphing)", "peak MiB"],
        [
            [
                s["hidden_size"],
                s["batch"],
                s["length"],
                s["model"],
                s["options"],
                f"{s['ms']:.2f}",
                f"{s['host_ms']:.2f}" if s.get("host_ms") is not None else "-",
                s.get("kernels") or "-",
                vs_ln(s),
                "-" if s["peak_mib"] is None or graphed(s) else f"{s['peak_mib']:.1f}",
            ]
            for s in r["steps"]
        ],
    )
    if any(graphed(s) for s in r["steps"]):
        steps += ("\n\nA graphed step's peak is not shown: its memory is taken once, at capture, in the "
                  "graph's own pool, so the allocator sees no new memory during a replay.")
    untimed = r.get("untimed_points") or []
    if untimed:
        steps += "\n\nNot timed (the run's `--budget-s` ran out first): " + ", ".join(
            f"H={u['hidden']} B={u['batch']} T={u['length']}" for u in untimed
        )
    sharing = table(
        ["trials sharing the GPU", "CUDA graph", "steps/s per trial", "steps/s in all", "vs alone"],
        [
            [
                s["processes"],
                "yes" if s.get("cuda_graph") else "no",
                f"{s['steps_per_s_per_trial']:.1f}",
                f"{s['steps_per_s_total']:.1f}",
                f"{s['speedup_vs_one']:.2f}x",
            ]
            for s in r["sharing"]
        ],
    )
    return "\n\n".join([provenance(p), steps, sharing])


def render_driver_profile(p: dict[str, Any]) -> str:
    r = p["results"]
    total, per_trial = max(r["samples"], 1), r["driver_cpu_s"] / max(r["trials"], 1)

    def row(name: str, n: int) -> list[str]:
        return [name, f"{100 * n / total:.1f} %", f"{per_trial * n / total:.3f}"]

    rows = [row(name, n) for name, n in r["groups"].items()]
    rows += [row(f"... other thread: {name}", n) for name, n in list(r["other_threads"].items())[:6]]
    head = (f"{r['trials']} trials in {r['wall_s']:.0f} s; py-spy saw the driver's threads active for "
            f"{r['driver_cpu_s']:.0f} thread-s ({r['samples']} samples at {r['rate_hz']} Hz), "
            f"{per_trial:.2f} s per trial (an upper bound on its CPU: see below).")
    header = ["where the driver's threads were", "share of samples", "sampled s per trial"]
    return "\n\n".join([provenance(p), head, table(header, rows)])


def render_peers(p: dict[str, Any]) -> str:
    r = p["results"]

    def ours(name: str, options: dict[str, Any]) -> str:
        return f"`{name}` ({', '.join(f'{k}: {v}' for k, v in options.items())})"

    peers = table(
        ["peer", "repository @ commit", "file: class", "timed as", "implements (S = 1)", "timed against",
         "differences from ours"],
        [
            [
                q["key"],
                f"[{q['repo']}]({q['url']}) @ `{q['commit'][:7]}`",
                q["entry"],
                q["form"],
                q["implements"],
                ours(q["ours"], q["ours_options"]),
                q["differences"] or "none",
            ]
            for q in r["peers"]
        ],
    )

    def same(s: dict[str, Any]) -> str:
        if s["same_function"] is None:
            return "not checked"
        diff = max(s["logits_max_abs_diff"], s["embed_grad_max_abs_diff"])
        return f"{'yes' if s['same_function'] else '**no**'} ({diff:.1e})"

    steps = table(
        ["peer", "repo", "commit", "H", "peer ms", "ours ms", "speed-up (peer / ours)",
         "same function? (float64 max abs diff)"],
        [
            [
                s["peer"],
                s["repo"],
                f"`{s['commit'][:7]}`",
                s["hidden_size"],
                f"{s['peer_cpu_ms']:.1f}",
                f"{s['ours_cpu_ms']:.1f}",
                f"**{s['speedup']:.2f}x**",
                same(s),
            ]
            for s in r["steps"]
        ],
    )
    setup = (
        f"Batch {r['batch']}, T={r['length']}, S={r['inner_steps']}, η={r['fast_lr']}, λ={r['decay']}; "
        f"ms = median CPU time of one train step (`time.thread_time`), one torch thread; \"same function\": "
        f"logits and embedding gradient within {r['same_function_below']:.0e} of ours in float64, with the "
        "peer's weights copied into ours."
    )
    return "\n\n".join([provenance(p), peers, setup, steps])


RENDERERS: dict[str, Callable[[dict[str, Any]], str]] = {
    "allocator": render_allocator,
    "driver_profile": render_driver_profile,
    "fixed_cost": render_fixed_cost,
    "models": render_models,
    "peers": render_peers,
    "sweep_overhead": render_sweep_overhead,
    "sweep_snapshots": render_sweep_snapshots,
    "sweep_against": render_sweep_against,
    "search_efficiency": render_search_efficiency,
    "tracking": render_tracking,
    "gpu": render_gpu,
    "fw_ln_bound": render_fw_ln_bound,
    "kernels_ab": render_kernels_ab,
}


def render(text: str, results_dir: Path = RESULTS_DIR) -> str:
    """The page with every marked block whose JSON exists regenerated."""

    def block(m: re.Match) -> str:
        path = results_dir / f"{m['name']}.json"
        if not path.exists():
            return m.group(0)
        payload = json.loads(path.read_text())
        kind = payload.get("kind", payload.get("benchmark"))
        if kind not in RENDERERS:
            raise SystemExit(f"{path}: no renderer for kind {kind!r}; known: {', '.join(RENDERERS)}")
        body = RENDERERS[kind](payload)
        note = f"<!-- generated by benchmarks/render.py from benchmarks/results/{path.name} -->"
        return f"{m.group(1)}{note}\n{body}\n{m.group(4)}"

    return BLOCK.sub(block, text)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/benchmarks.md is out of date")
    parser.add_argument("--doc", type=Path, default=DOC)
    parser.add_argument("--results", type=Path, default=RESULTS_DIR)
    args = parser.parse_args()
    text = args.doc.read_text()
    new = render(text, args.results)
    if args.check:
        if new != text:
            print(f"{args.doc} is out of date: run benchmarks/render.py", file=sys.stderr)
            return 1
        return 0
    if new != text:
        args.doc.write_text(new)
        print(f"updated {args.doc}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
