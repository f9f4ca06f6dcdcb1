"""Turn results into the printed table, bench/RESULTS.md and bench/chart.png."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

LABELS = {"fh-tasks": "fh-tasks", "fh-tasks-async": "fh-tasks (async def task)",
          "fh-tasks-full": "fh-tasks (durability=full)", "huey-sqlite": "huey SqliteHuey",
          "huey-redis": "huey RedisHuey", "celery": "Celery (Redis)", "dramatiq": "Dramatiq (Redis)",
          "rq": "RQ (fork per job)", "rq-simple": "RQ SimpleWorker", "arq": "arq"}


def fmt(st: dict[str, Any] | None, digits: int = 0, unit: str = "") -> str:
    "median (min–max), or the single value when there was one repetition."
    if not st or st.get("median") is None: return "–"
    f = f"{{:,.{digits}f}}"
    m = f.format(st["median"]) + unit
    if st.get("n", 1) > 1: m += f" ({f.format(st['min'])}–{f.format(st['max'])})"
    return m


def ratio(x: float | None, y: float | None) -> str:
    return f"{x / y:.2f}×" if x and y else "–"


def _med(st: dict[str, Any] | None) -> float | None:
    return st.get("median") if st else None


def _label(key: str) -> str:
    return LABELS.get(key, key)


def request_table(r: dict[str, Any]) -> list[str]:
    v = r["variants"]
    b50 = _med(v["starlette"]["p50_ms"])
    rows = ["| Route | req/s | p50 ms | p99 ms | p50 ÷ (b) |", "|---|--:|--:|--:|--:|"]
    for x in v.values():
        rows.append(f"| {x['label']} | {fmt(x['rps'])} | {fmt(x['p50_ms'], 2)} | {fmt(x['p99_ms'], 2)} | "
                    f"{ratio(_med(x['p50_ms']), b50)} |")
    c = r["ratio_c_b"]
    return rows + ["", f"(c) ÷ (b), paired per repetition: p50 **{fmt(c['p50'], 3)}** (goal ≤ 1.15), "
                       f"p99 {fmt(c['p99'], 3)}, req/s {fmt(c['rps'], 3)}. Load: `{r['tool']}`."]


def enqueue_table(e: dict[str, Any]) -> list[str]:
    fh = e.get("fh-tasks", {})
    rows = ["| Peer | single jobs/s | fh-tasks ÷ peer | batch jobs/s | fh-tasks ÷ peer | bulk API measured |",
            "|---|--:|--:|--:|--:|---|"]
    for k, x in e.items():
        if "error" in x:
            rows.append(f"| {_label(k)} | failed: {x['error'][:80]} | | | | |")
            continue
        ours = k.startswith("fh-tasks")
        single = "" if ours else ratio(_med(fh.get("single")), _med(x["single"]))
        batch = "" if ours else ratio(_med(fh.get("batch")), _med(x["batch"]))
        rows.append(f"| {_label(k)} | {fmt(x['single'])} | {single} | {fmt(x['batch'])} | {batch} | "
                    f"{x['batch_api'] or 'none'} |")
    return rows


def _drain_cell(x: dict[str, Any], p: str) -> str:
    st = x.get(p)
    if x.get(f"error_{p}"): return "failed"
    if not st: return "not run"
    txt = fmt(st)
    if st.get("done") and min(st["done"]) < x["jobs"]: txt += f" †{min(st['done']):,}/{x['jobs']:,}"
    return txt


def drain_table(d: dict[str, Any]) -> list[str]:
    fh = d.get("fh-tasks", {})
    rows = ["| Peer | 1 process jobs/s | fh-tasks ÷ peer | 2 processes jobs/s | fh-tasks ÷ peer | "
            "worker and concurrency |", "|---|--:|--:|--:|--:|---|"]
    for k, x in d.items():
        if "error" in x:
            rows.append(f"| {_label(k)} | failed: {x['error'][:80]} | | | | |")
            continue
        cells = []
        for p in ("1", "2"):
            cells += [_drain_cell(x, p), "" if k.startswith("fh-tasks") else ratio(_med(fh.get(p)), _med(x.get(p)))]
        rows.append(f"| {_label(k)} | {' | '.join(cells)} | {x['concurrency']} |")
    return rows


def pickup_table(p: dict[str, Any]) -> list[str]:
    rows = ["| Peer | how | p50 ms | p99 ms | max ms | peer ÷ fh-tasks (p50) |", "|---|---|--:|--:|--:|--:|"]
    for k, x in p.items():
        if "error" in x:
            rows.append(f"| {x.get('label', k)} | {x.get('how', '')} | failed | | | |")
            continue
        ref = p.get(x.get("ref") or "", {})
        r = ratio(_med(x["p50_ms"]), _med(ref.get("p50_ms"))) if ref and x.get("ref") != k else ""
        rows.append(f"| {x['label']} | {x['how']} | {fmt(x['p50_ms'], 2)} | {fmt(x['p99_ms'], 2)} | "
                    f"{fmt(x['max_ms'], 1)} | {r} |")
    return rows


def _pick_cell(x: dict[str, Any] | None) -> str:
    if not x: return "–"
    return f"{fmt(x.get('p50'), 2)} / {fmt(x.get('p99'), 2)}"


def load_table(ld: dict[str, Any]) -> list[str]:
    d, fh = ld["drain"], ld["drain"].get("fh-tasks", {})
    rates = [str(int(r)) for r in ld["rates"]]
    rows = [f"A producer (one process) defers {ld['jobs']:,} jobs one call at a time while the workers drain them; "
            "each job makes one Redis round trip (`INCR`). Jobs/s from the first job's start to the last job's end. "
            f"Pickup: one worker process, the producer deferring at a steady rate for {ld['seconds']:g} s. "
            "Repetitions alternate between peers; cells show median (min–max) of the repetitions.", "",
            "| Peer | 1 process jobs/s | fh-tasks ÷ peer | 2 processes jobs/s | fh-tasks ÷ peer | "
            + " | ".join(f"pickup p50 / p99 ms at {r}/s" for r in rates) + " | worker |",
            "|---|--:|--:|--:|--:|" + "--:|" * len(rates) + "---|"]
    for k, x in d.items():
        ours = k.startswith("fh-tasks")
        cells = []
        for p in ("1", "2"):
            cells += [fmt(x.get(p)), "" if ours else ratio(_med(fh.get(p)), _med(x.get(p)))]
        pk = ld["pickup"].get(k, {})
        cells += [_pick_cell(pk.get(r)) for r in rates]
        rows.append(f"| {_label(k)} | {' | '.join(cells)} | {ld['concurrency'].get(k, '')} |")
    ip, r = ld["inproc"], ld["ratios"]
    rows += ["", "In-process, `async def` task, producer on the same event loop:", "",
             "| Worker | jobs/s |", "|---|--:|",
             f"| fh-tasks in-process worker (`Tasks(app)` default, stored) | {fmt(ip.get('fh-tasks'))} |",
             f"| Starlette `BackgroundTask` (not stored) | {fmt(ip.get('starlette'))} |", "",
             "Ratios, paired within each repetition: "
             f"2 processes ÷ 1 **{fmt(r['fh2_over_fh1'], 2, '×')}**; "
             f"2 processes ÷ best Redis peer at 2 **{fmt(r['fh2_over_best_redis2'], 2, '×')}**; "
             f"1 process ÷ huey+Redis **{fmt(r['fh1_over_huey_redis1'], 2, '×')}** (sync), "
             f"**{fmt(r['fh_async1_over_huey_redis1'], 2, '×')}** (async tasks); "
             f"in-process ÷ Starlette **{fmt(r['inproc_over_starlette'], 2, '×')}**."]
    if ld.get("errors"): rows += ["", "Failures: " + "; ".join(f"{k}: {v[:120]}" for k, v in ld["errors"].items())]
    return rows


def memory_table(m: dict[str, Any]) -> list[str]:
    rows = ["| Jobs queued | DB file MiB | peak worker RSS MiB |", "|--:|--:|--:|"]
    for depth, x in m["depths"].items():
        rows.append(f"| {int(depth):,} | {x['db_mb']:,.0f} | {fmt(x['rss_mb'], 1)} |")
    return rows + ["", f"RSS ratio deepest ÷ shallowest: **{m['ratio_deep_shallow']:.2f}** (goal: flat, ≈ 1.0)."]


def cpu_table(c: dict[str, Any]) -> list[str]:
    jobs_only = c.get("speedup_jobs") is not None
    rows = [f"{c['jobs']} jobs of pure-Python arithmetic ({c['work']:,} loop iterations each), worker concurrency "
            f"{c['concurrency']}, measured by `{c.get('cmd') or c['source']}`; the process pool's start-up is included"
            + ("; \"jobs\" runs from the first job's start to the last job's end" if jobs_only else "")
            + f". Load average after: {c.get('load_avg_after')} (other work shares the 2 cores).", ""]
    if jobs_only:
        return rows + [
            "| Pool | drain s | speed-up | jobs s | speed-up |", "|---|--:|--:|--:|--:|",
            f"| thread pool (plain task) | {fmt(c['thread_s'], 2)} | 1.00× | {fmt(c['thread_jobs_s'], 2)} | 1.00× |",
            f"| process pool (`process=True`) | {fmt(c['process_s'], 2)} | **{fmt(c['speedup'], 2, '×')}** | "
            f"{fmt(c['process_jobs_s'], 2)} | {fmt(c['speedup_jobs'], 2, '×')} |"]
    return rows + ["| Pool | drain s | speed-up |", "|---|--:|--:|",
                   f"| thread pool (plain task) | {fmt(c['thread_s'], 2)} | 1.00× |",
                   f"| process pool (`process=True`) | {fmt(c['process_s'], 2)} | **{fmt(c['speedup'], 2, '×')}** |"]


def events_table(e: dict[str, Any]) -> list[str]:
    w, c = e["worker"], e["drain"]
    rows = [f"An `fh-tasks worker` process runs jobs of {e['nap_ms']:g} ms that a producer process defers at "
            f"{e['rate']:.0f}/s for {e['seconds']:g} s (concurrency {e['concurrency']}); a subscriber "
            "(`tasks.subscribe`) in a third process notes each event's arrival. Latency = arrival − `event.at` "
            "(the store's time of the change).", "",
            "| Events | changed by | p50 ms | p99 ms | max ms | events |", "|---|---|--:|--:|--:|--:|",
            f"| **started + succeeded** | worker process | {fmt(w['p50_ms'], 2)} | **{fmt(w['p99_ms'], 2)}** | "
            f"{fmt(w['max_ms'], 1)} | {sum(w['events']):,} |"]
    for kind, x in e["kinds"].items():
        who = "producer process" if kind == "stored" else "worker process"
        rows.append(f"| {kind} | {who} | {fmt(x['p50_ms'], 2)} | {fmt(x['p99_ms'], 2)} | {fmt(x['max_ms'], 1)} | "
                    f"{sum(x['events']):,} |")
    return rows + ["", f"Target: p99 ≤ {e['target_p99_ms']:.0f} ms for the worker's events.", "",
                   f"Cost on the job path: one worker process draining {c['jobs']:,} queued no-op jobs.", "",
                   "| Subscribers | jobs/s | events delivered |", "|---|--:|--:|",
                   f"| none (triggers write nothing) | {fmt(c['without'])} | – |",
                   f"| one, in another process | {fmt(c['with'])} | {', '.join(f'{n:,}' for n in c['delivered'])} |",
                   "", f"With ÷ without, paired per repetition: **{fmt(c['with_over_without'], 3)}**."]


# -- goals -----------------------------------------------------------------------------------------
Goal = dict[str, Any]


def _goal(name: str, target: str, value: float | None, shown: str, ok: bool) -> Goal:
    return {"goal": name, "target": target, "value": value, "shown": shown, "met": ok}


def _request_goals(r: dict[str, Any]) -> list[Goal]:
    v = _med(r["ratio_c_b"]["p50"])
    if v is None: return []
    return [_goal("request p50 with a durable job ÷ Starlette BackgroundTask", "≤ 1.15", v, f"{v:.3f}", v <= 1.15)]


def _drain_goals(d: dict[str, Any]) -> list[Goal]:
    fh1 = _med((d.get("fh-tasks") or {}).get("1"))
    if not fh1: return []
    peers = {k: _med(x.get("1")) for k, x in d.items() if not k.startswith("fh-tasks") and x.get("1")}
    peers = {k: v for k, v in peers.items() if v}
    out = []
    if peers:
        best = max(peers, key=lambda k: peers[k])
        r = fh1 / peers[best]
        out.append(_goal(f"drain, 1 process ÷ best peer ({_label(best)})", "≥ 2×", r, f"{r:.2f}×", r >= 2))
    return out + [_goal("drain, 1 fh-tasks worker process", "≥ 10,000 jobs/s", fh1, f"{fh1:,.0f} jobs/s",
                        fh1 >= 10_000)]


def _pickup_goals(p: dict[str, Any]) -> list[Goal]:
    out = []
    for key in ("fh-inproc", "fh-uvicorn"):
        v = _med(p.get(key, {}).get("p50_ms"))
        if v is not None:
            out.append(_goal(f"pickup p50, {p[key]['how']}", "≤ 2 ms (aim 1 ms)", v, f"{v:.2f} ms", v <= 2))
    return out


def _load_goals(ld: dict[str, Any]) -> list[Goal]:
    r, out = ld["ratios"], []
    for key, name, target in (("fh2_over_fh1", "under load: 2 worker processes ÷ 1", 1.6),
                              ("fh2_over_best_redis2", "under load: 2 processes ÷ best Redis peer at 2", 2.0),
                              ("fh1_over_huey_redis1", "under load: 1 process ÷ huey+Redis (sync)", 2.0),
                              ("fh_async1_over_huey_redis1", "under load: 1 process (async) ÷ huey+Redis", 3.0),
                              ("inproc_over_starlette", "in-process worker ÷ Starlette BackgroundTask", 0.9)):
        v = _med(r.get(key))
        if v is not None: out.append(_goal(name, f"≥ {target:g}×", v, fmt(r[key], 2, "×"), v >= target))
    for rate, target in (("100", 5.0), ("1000", 20.0)):
        st = (ld["pickup"].get("fh-tasks", {}).get(rate) or {}).get("p99")
        v = _med(st)
        if v is not None:
            out.append(_goal(f"under load: cross-process pickup p99 at {rate}/s", f"≤ {target:g} ms", v,
                             fmt(st, 2, " ms"), v <= target))
    return out


def _memory_goals(m: dict[str, Any]) -> list[Goal]:
    v = m["ratio_deep_shallow"]
    depths = sorted(int(k) for k in m["depths"])
    return [_goal(f"worker RSS, {depths[-1]:,} ÷ {depths[0]:,} queued", "flat (≤ 1.10)", v, f"{v:.2f}", v <= 1.10)]


def _enqueue_goals(e: dict[str, Any]) -> list[Goal]:
    fh = e.get("fh-tasks") or {}
    out = []
    for key, name, target in (("single", "enqueue, one `defer()` per commit", 20_000),
                              ("batch", "enqueue, `defer_many` batches of 100", 100_000)):
        v = _med(fh.get(key))
        if v: out.append(_goal(name, f"≥ {target:,} jobs/s", v, f"{v:,.0f} jobs/s", v >= target))
    return out


def _cpu_goals(c: dict[str, Any]) -> list[Goal]:
    out = []
    for key, what in (("speedup", "whole drain"), ("speedup_jobs", "jobs only")):
        v = _med(c.get(key))
        if v: out.append(_goal(f"process pool ÷ thread pool on 2 cores ({what})", "≥ 1.8×", v, f"{v:.2f}×", v >= 1.8))
    return out


def _events_goals(e: dict[str, Any]) -> list[Goal]:
    v, target = _med(e["worker"]["p99_ms"]), e["target_p99_ms"]
    if v is None: return []
    return [_goal("event latency p99, worker process → subscriber in another process", f"≤ {target:.0f} ms", v,
                  f"{v:.2f} ms", v <= target)]


_GOALS: dict[str, Callable[[dict[str, Any]], list[Goal]]] = {
    "load": _load_goals, "request": _request_goals, "drain": _drain_goals, "pickup": _pickup_goals,
    "memory": _memory_goals, "enqueue": _enqueue_goals, "cpu": _cpu_goals, "events": _events_goals}


def goals(res: dict[str, Any]) -> list[Goal]:
    "Where fh-tasks stands against the goals of the benchmark."
    return [g for key, fn in _GOALS.items() if res.get(key) for g in fn(res[key])]


def goals_table(gs: list[Goal]) -> list[str]:
    rows = ["| Goal | target | now | met |", "|---|---|--:|:-:|"]
    return rows + [f"| {g['goal']} | {g['target']} | {g['shown']} | {'yes' if g['met'] else '**no**'} |" for g in gs]


# -- documents -------------------------------------------------------------------------------------
def tables(res: dict[str, Any]) -> list[str]:
    "Every section's markdown table, in order."
    s = res["settings"]
    sections = [("load", "0. Under load: producer and workers at once, one Redis round trip per job", load_table),
                ("request", "1. Request overhead (FastHTML under uvicorn, `async def` handlers)", request_table),
                ("enqueue", "2. Enqueue throughput (one producer, no worker running)", enqueue_table),
                ("drain", f"3. Drain throughput ({s['drain_jobs']:,} queued no-op jobs)", drain_table),
                ("pickup", f"4. Pickup latency (start − enqueue, ~{s['pickup_rate']:.0f} jobs/s)", pickup_table),
                ("memory", "5. Worker memory against queue depth (fh-tasks)", memory_table),
                ("cpu", "6. CPU-bound jobs: process pool vs thread pool (fh-tasks)", cpu_table),
                ("events", "7. Job events: latency to a subscriber in another process, cost on the job path "
                 "(fh-tasks)", events_table)]
    out: list[str] = []
    for key, title, fn in sections:
        if res.get(key): out += [f"### {title}", "", *fn(res[key]), ""]
        elif key in res.get("errors", {}): out += [f"### {title}", "", f"Failed: `{res['errors'][key][-300:]}`", ""]
    if res.get("goals"): out += ["### Goals", "", *goals_table(res["goals"]), ""]
    return out


def _steal_line(meta: dict[str, Any]) -> list[str]:
    "The CPU time the hypervisor took during the run (`/proc/stat` steal): figures drop with it, ratios hold better."
    st = meta.get("steal_pct") or {}
    if st.get("run") is None: return []
    parts = ", ".join(f"{k} {v} %" for k, v in st.items() if k != "run" and v is not None)
    return [f"- CPU time taken by the hypervisor during the run (steal, `/proc/stat`): {st['run']} %"
            + (f" (by section: {parts})" if parts else "")]


def markdown(res: dict[str, Any]) -> str:
    m, s, mc = res["meta"], res["settings"], res["meta"]["machine"]
    mode = ("quick (1 repetition, smaller sizes: each cell is one run)" if s["quick"]
            else f"full ({s['reps']} repetitions; cells show median (min–max))")
    lines = ["# fh-tasks benchmark results", "",
             f"Generated by `make bench{' QUICK=1' if s['quick'] else ''}` (`python -m bench.run"
             f"{' --quick' if s['quick'] else ''}`) on {m['date']} in {m['seconds']:.0f} s, source commit "
             f"{_source(m)}. Mode: {mode}.", "",
             "The machine is shared and noisy: absolute figures drift between runs; ratios within one run hold "
             "better. Ratio columns read \"how many times better fh-tasks is\" (> 1: fh-tasks ahead).", "",
             "## Machine", "",
             f"- CPU: {mc['cpu']}, {mc['cores']} cores, {mc['memory_gb']} GB RAM; load average at start "
             f"{mc['load_avg_at_start']}",
             f"- {mc['os']}; Python {mc['python']}; SQLite {mc['sqlite']} (default `synchronous` = "
             f"{m['sqlite_default_synchronous']}); "
             + (f"Redis {m['redis_version']} at {m['redis']}" if m['redis'] else "no Redis (not needed)")
             + f"; {mc['wrk']}",
             "- Packages: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v),
             *_steal_line(m), "",
             "## Results", "", *tables(res), "## Notes", "", *[f"- {n}" for n in res["notes"]], ""]
    return "\n".join(lines)


def _source(m: dict[str, Any]) -> str:
    src = m.get("source") or {}
    return f"`{src.get('commit')}`" + (" with uncommitted changes in fh_tasks/" if src.get("fh_tasks_modified") else "")


def chart(res: dict[str, Any], path: Path) -> None:
    "Drain throughput per peer (1 and 2 processes) and request latency per route (p50, p99)."
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(14, 5.4))
    h = 0.38
    d = {k: x for k, x in (res.get("drain") or {}).items() if x.get("1")}
    ys = range(len(d))
    for off, p, color in ((-h / 2, "1", "#2b6cb0"), (h / 2, "2", "#90cdf4")):
        bars = ax1.barh([y + off for y in ys], [_med(x.get(p)) or 0 for x in d.values()], height=h, color=color,
                        label=f"{p} process{'es' if p == '2' else ''}")
        ax1.bar_label(bars, labels=[f"{v:,.0f}" if v else "" for v in bars.datavalues], padding=2, fontsize=7)
    ax1.set_yticks(list(ys), [_label(k) for k in d])
    ax1.invert_yaxis()
    ax1.set_xlabel("jobs/s (higher is better)")
    ax1.margins(x=0.12)
    ax1.set_title(f"Drain throughput, {res['settings']['drain_jobs']:,} no-op jobs")
    ax1.legend(loc="lower right")
    r = (res.get("request") or {}).get("variants", {})
    ys2 = range(len(r))
    for off, key, color in ((-h / 2, "p50_ms", "#2f855a"), (h / 2, "p99_ms", "#9ae6b4")):
        bars = ax2.barh([y + off for y in ys2], [_med(x[key]) or 0 for x in r.values()], height=h, color=color,
                        label=key.split("_")[0])
        ax2.bar_label(bars, labels=[f"{v:.1f}" for v in bars.datavalues], padding=2, fontsize=7)
    ax2.set_yticks(list(ys2), [x["label"] for x in r.values()])
    ax2.invert_yaxis()
    ax2.set_xlabel("latency ms (lower is better)")
    ax2.margins(x=0.1)
    ax2.set_title("Request latency, FastHTML under uvicorn (wrk -c8)")
    ax2.legend(loc="lower right")
    fig.suptitle(f"fh-tasks benchmark, {res['meta']['date']} ({'quick' if res['settings']['quick'] else 'full'} run)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
