"""Overload and soak benchmark: a real `moebert serve` (the bundled models by default) under bounded
overload, scenario after scenario, with its resident memory sampled throughout.

Scenarios (closed loop: each client sends its next request when the last is answered; after a 429 it
waits 50 ms and tries again, so the server stays overloaded):
- classify: C clients of SST-2 dev sentences;
- short QA: C clients of SQuAD dev question/context pairs;
- long QA + classify: clients of SQuAD contexts repeated to ~5,000 tokens, and a few classify clients
  beside them (classify's latency while long QA saturates the server);
- disconnect storm: long-QA clients that hang up after 50–500 ms, a classify client beside them;
- long-QA soak: long-QA clients for --soak-s seconds (the memory plateau).

The load clients run on the server's cores; they run at a lower CPU priority (--client-nice) so that
they take the CPU a client on another machine would not, and the server's own time for each response
(its x-total-time-ms header) is reported beside the time the clients saw.

Per scenario: status codes, connection errors (resets, refused), p50/p99 of accepted (200) requests,
p99 of 429s, RSS at start/peak/end. Writes soak.md, soak.json and soak.png (RSS over time) under
benchmarks/results/. Targets (issue 12, 2 cores): no 5xx and no connection errors anywhere, 429 p99 ≤
50 ms, accepted p99 ≤ the request deadline, classify p99 ≤ 500 ms beside long QA, and after ≥ 5 min of
long QA an RSS ≤ 1.5 GB that is flat over the last 2 minutes.

    python benchmarks/soak.py                      # ~10 min: every scenario, a 330 s soak
    python benchmarks/soak.py --quick              # ~2 min: short scenarios, a 60 s soak
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MOEBERT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


def sst2_sentences() -> list[str]:
    with open(DATA / "glue" / "SST-2" / "dev.tsv", newline="") as f:
        return [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]


def squad_pairs(limit: int = 2000) -> list[tuple[str, str]]:
    data = json.loads((DATA / "squad" / "dev-v1.1.json").read_text())["data"]
    return [(qa["question"], p["context"]) for art in data for p in art["paragraphs"] for qa in p["qas"]][:limit]


def long_pairs(pairs: list[tuple[str, str]], chars: int = 22_000) -> list[tuple[str, str]]:
    """Contexts repeated to ~chars characters (~5,000 tokens of English): ~20 windows of 384 each."""
    return [(q, " ".join([c] * max(1, chars // len(c)))) for q, c in pairs[::40]]


@dataclass
class Outcome:
    kind: str  # which client kind: classify, qa, long_qa, storm
    status: int | None  # None: a connection error
    seconds: float  # as the client saw it (this load generator shares the server's cores)
    error: str = ""
    server_s: float | None = None  # the server's own time for it (x-total-time-ms)


@dataclass
class Scenario:
    name: str
    seconds: float
    outcomes: list[Outcome] = field(default_factory=list)
    rss_mb: list[float] = field(default_factory=list)

    def summary(self, kind: str | None = None) -> dict:
        rows = [o for o in self.outcomes if kind is None or o.kind == kind]
        ok = [o.seconds for o in rows if o.status == 200]
        busy = [o.seconds for o in rows if o.status == 429]
        busy_server = [o.server_s for o in rows if o.status == 429 and o.server_s is not None]
        ok_server = [o.server_s for o in rows if o.status == 200 and o.server_s is not None]
        codes: dict[str, int] = {}
        for o in rows:
            key = str(o.status) if o.status is not None else "conn_error"
            codes[key] = codes.get(key, 0) + 1
        pct = lambda xs, q: round(float(np.percentile(xs, q)) * 1000, 1) if xs else None
        return {
            "requests": len(rows), "codes": dict(sorted(codes.items())),
            "5xx": sum(1 for o in rows if o.status is not None and o.status >= 500),
            "conn_errors": sum(1 for o in rows if o.status is None),
            "ok_p50_ms": pct(ok, 50), "ok_p99_ms": pct(ok, 99), "429_p99_ms": pct(busy, 99),
            "server_ok_p99_ms": pct(ok_server, 99), "server_429_p99_ms": pct(busy_server, 99),
            "ok_per_s": round(len(ok) / self.seconds, 2),
        }  # fmt: skip


class RssSampler(threading.Thread):
    def __init__(self, pid: int, every_s: float = 1.0):
        super().__init__(daemon=True)
        self.pid, self.every_s, self.samples = pid, every_s, []  # (t, MB, scenario)
        self.scenario = "start"
        self.started = time.monotonic()
        self._stop = threading.Event()

    def rss_mb(self) -> float:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return float("nan")

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.monotonic() - self.started, self.rss_mb(), self.scenario))
            except OSError:
                return
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()


async def client_loop(c: httpx.AsyncClient, kind: str, path: str, bodies: list, until: float, out: list,
                      rng: random.Random, hang_up_s: tuple[float, float] | None = None) -> None:  # fmt: skip
    while time.monotonic() < until:
        body = rng.choice(bodies)
        t0 = time.perf_counter()
        try:
            if hang_up_s is not None:  # the disconnect storm: give up after a random short time
                try:
                    r = await asyncio.wait_for(c.post(path, json=body), rng.uniform(*hang_up_s))
                except TimeoutError:
                    continue  # we hung up: nothing to count
            else:
                r = await c.post(path, json=body)
        except httpx.HTTPError as err:
            out.append(Outcome(kind, None, time.perf_counter() - t0, f"{type(err).__name__}: {err}"))
            await asyncio.sleep(0.05)
            continue
        server_ms = r.headers.get("x-total-time-ms")
        out.append(Outcome(kind, r.status_code, time.perf_counter() - t0, "" if r.status_code < 500 else r.text[:200],
                           float(server_ms) / 1000 if server_ms else None))  # fmt: skip
        if r.status_code == 429:
            await asyncio.sleep(0.05)


async def run_scenario(url: str, name: str, seconds: float, clients: list[tuple[str, str, list, int, dict]],
                       sampler: RssSampler, headers: dict) -> Scenario:  # fmt: skip
    """clients: (kind, path, bodies, how many, extra client_loop kwargs)."""
    sampler.scenario = name
    scenario = Scenario(name, seconds)
    start_rss = sampler.rss_mb()
    until = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=1000)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits, headers=headers) as c:
        tasks = []
        for k, (kind, path, bodies, n, extra) in enumerate(clients):
            for i in range(n):
                rng = random.Random(1000 * k + i)
                tasks.append(client_loop(c, kind, path, bodies, until, scenario.outcomes, rng, **extra))
        await asyncio.gather(*tasks)
    await asyncio.sleep(1.0)
    rss = [mb for _, mb, s in sampler.samples if s == name]
    scenario.rss_mb = [start_rss, max(rss + [start_rss]), sampler.rss_mb()]
    return scenario


def training_running() -> str:
    """The training jobs on this machine (they share its cores), said as running or paused (SIGSTOP)."""
    out = subprocess.run(["pgrep", "-af", "quality.py"], capture_output=True, text=True).stdout.strip()
    jobs = []
    for line in filter(None, out.splitlines()):
        pid = line.split()[0]
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            state = "?"
        jobs.append(f"{line} ({'paused with SIGSTOP for the whole run' if state == 'T' else 'running'})")
    return "; ".join(jobs) or "no"


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--cls-model", default=str(REPO / "models" / "sst2"), help="classification checkpoint")
    p.add_argument("--qa-model", default=str(REPO / "models" / "squad"), help="QA checkpoint")
    p.add_argument("--clients", type=int, default=64, help="clients per overload scenario (default 64)")
    p.add_argument("--long-clients", type=int, default=32, help="long-QA clients (default 32)")
    p.add_argument("--seconds", type=float, default=40, help="length of each overload scenario (default 40)")
    p.add_argument("--soak-s", type=float, default=330, help="length of the long-QA soak (default 330)")
    p.add_argument("--request-timeout-s", type=float, default=10, help="the server's deadline (default 10)")
    p.add_argument("--quick", action="store_true", help="15 s scenarios and a 60 s soak (a smoke run)")
    p.add_argument("--output", default=str(RESULTS / "soak"), help="output prefix (default results/soak)")
    p.add_argument("--server-flag", action="append", default=[], help="extra `moebert serve` flag (repeatable)")
    p.add_argument("--client-nice", type=int, default=15,
                   help="CPU priority of these load clients below the server's (Linux nice; default 15): they share "
                   "the server's cores, and at equal priority take the CPU a remote client would not")  # fmt: skip
    args = p.parse_args()
    if args.quick:
        args.seconds, args.soak_s = 15, 60

    from server_process import ServerProcess

    sentences = sst2_sentences()
    pairs = squad_pairs()
    longs = long_pairs(pairs)
    cls_bodies = [{"inputs": s, "model": "cls"} for s in sentences]
    qa_bodies = [{"question": q, "context": c, "model": "qa"} for q, c in pairs]
    long_bodies = [{"question": q, "context": c, "model": "qa"} for q, c in longs]
    flags = ["--request-timeout-s", str(args.request_timeout_s), *args.server_flag]
    training = training_running()
    print(f"training job running: {training}", flush=True)
    log = open(Path(args.output).with_suffix(".server.log"), "w")  # noqa: SIM115 (lives as long as the server)
    server = ServerProcess({"cls": args.cls_model, "qa": args.qa_model}, *flags, log=log).start(timeout_s=600)
    sampler = RssSampler(server.proc.pid)
    sampler.start()
    if args.client_nice and sys.platform == "linux":
        os.nice(args.client_nice)  # this thread, and the asyncio clients it runs (the server is started already)
    C, L, S = args.clients, args.long_clients, args.seconds
    plan = [
        ("classify", S, [("classify", "/v1/classify", cls_bodies, C, {})]),
        ("short QA", S, [("qa", "/v1/qa", qa_bodies, C, {})]),
        ("long QA + classify", S * 1.5,
         [("long_qa", "/v1/qa", long_bodies, L, {}), ("classify", "/v1/classify", cls_bodies, 4, {})]),
        ("disconnect storm", S,
         [("storm", "/v1/qa", long_bodies, 100, {"hang_up_s": (0.05, 0.5)}),
          ("classify", "/v1/classify", cls_bodies, 2, {})]),
        ("long-QA soak", args.soak_s, [("long_qa", "/v1/qa", long_bodies, L // 2, {})]),
    ]  # fmt: skip
    scenarios = []
    try:
        for name, seconds, clients in plan:
            print(f"-- {name}: {seconds:.0f} s", flush=True)
            scenario = asyncio.run(run_scenario(server.url, name, seconds, clients, sampler, {}))
            scenarios.append(scenario)
            print(json.dumps(scenario.summary()), flush=True)
        healthy = httpx.get(server.url + "/health/ready", timeout=10).status_code == 200
    finally:
        sampler.stop()
        started = time.monotonic()
        exit_code = server.stop(timeout_s=60)
        drain_s = time.monotonic() - started
    write_results(args, scenarios, sampler, training, healthy, exit_code, drain_s, flags)


def write_results(args, scenarios, sampler, training, healthy, exit_code, drain_s, flags) -> None:
    deadline_ms = args.request_timeout_s * 1000
    rows, checks = [], []
    for sc in scenarios:
        kinds = sorted({o.kind for o in sc.outcomes})
        for kind in kinds:
            s = sc.summary(kind)
            rows.append((sc.name, kind, s, sc.rss_mb))
            checks.append((f"{sc.name}/{kind}: no 5xx, no connection errors", s["5xx"] == 0 and s["conn_errors"] == 0))
            if s["server_429_p99_ms"] is not None:
                checks.append((f"{sc.name}/{kind}: 429 p99 ≤ 50 ms in the server ({s['server_429_p99_ms']} ms; "
                               f"{s['429_p99_ms']} ms at the client)", s["server_429_p99_ms"] <= 50))  # fmt: skip
            if s["ok_p99_ms"] is not None and kind != "storm":  # the client's time: the stricter one
                checks.append((f"{sc.name}/{kind}: accepted p99 ≤ deadline at the client ({s['ok_p99_ms']} ms)",
                               s["ok_p99_ms"] <= deadline_ms))  # fmt: skip
        if sc.name == "long QA + classify":
            s = sc.summary("classify")
            checks.append((f"classify p99 beside long QA ≤ 500 ms in the server ({s['server_ok_p99_ms']} ms; "
                           f"{s['ok_p99_ms']} ms at the client)",
                           s["server_ok_p99_ms"] is not None and s["server_ok_p99_ms"] <= 500))  # fmt: skip
    soak = [(t, mb) for t, mb, s in sampler.samples if s == "long-QA soak"]
    plateau = {}
    if soak:
        t_end = soak[-1][0]
        last2 = [mb for t, mb in soak if t >= t_end - 120]
        first_half = [mb for t, mb in soak if t < t_end - 120]
        plateau = {
            "soak_s": round(t_end - soak[0][0]),
            "end_mb": round(soak[-1][1]),
            "last2min_min_mb": round(min(last2)),
            "last2min_max_mb": round(max(last2)),
            "before_last2min_max_mb": round(max(first_half)) if first_half else None,
        }
        flat = max(last2) - min(last2) <= 0.05 * max(last2) or (first_half and max(last2) <= max(first_half) * 1.02)
        checks.append((f"soak RSS ≤ 1.5 GB at the end ({plateau['end_mb']} MB)", soak[-1][1] <= 1536))
        checks.append(
            (
                f"soak RSS flat over the last 2 min ({plateau['last2min_min_mb']}–{plateau['last2min_max_mb']} MB)",
                bool(flat),
            )
        )
    checks.append(("server healthy after all scenarios", healthy))
    checks.append((f"SIGTERM: drained and exited 0 in {drain_s:.1f} s (exit {exit_code})", exit_code == 0))

    lines = [
        "# Overload and soak (benchmarks/soak.py)", "",
        f"Command: `python benchmarks/soak.py {' '.join(sys.argv[1:])}`; server flags: `{' '.join(flags)}`; "
        f"{os.cpu_count()} cores; load clients on the same cores at nice {args.client_nice} (below the server, as "
        f"a client on another machine would be). Training jobs on this machine: {training}.", "",
        "Latencies are as the load clients saw them; the load clients run on the server's 2 cores, so under a "
        "storm of retries they include the clients' own wait for CPU. `server` columns are the server's own "
        "time per response (its `x-total-time-ms` header: from the request reaching the app to the response).", "",
        "| scenario | clients | requests | status codes | 5xx | conn errors | accepted p50 ms | accepted p99 ms | "
        "server accepted p99 ms | 429 p99 ms | server 429 p99 ms | accepted/s | RSS start / peak / end MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for name, kind, s, rss in rows:
        codes = ", ".join(f"{k}: {v}" for k, v in s["codes"].items())
        lines.append(
            f"| {name} | {kind} | {s['requests']} | {codes} | {s['5xx']} | {s['conn_errors']} | {s['ok_p50_ms']} | "
            f"{s['ok_p99_ms']} | {s['server_ok_p99_ms']} | {s['429_p99_ms']} | {s['server_429_p99_ms']} | "
            f"{s['ok_per_s']} | {rss[0]:.0f} / {rss[1]:.0f} / {rss[2]:.0f} |"
        )
    lines += ["", "Storm clients hang up after 50–500 ms (their answers are not read; only what came back counts).", "",
              "| target | met |", "|---|---|"]  # fmt: skip
    lines += [f"| {what} | {'yes' if ok else '**no**'} |" for what, ok in checks]
    errors = [o.error for sc in scenarios for o in sc.outcomes if o.error][:5]
    if errors:
        lines += ["", "First errors:", *[f"- `{e}`" for e in errors]]
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    summary = {"scenarios": [{"name": n, "kind": k, **s, "rss_mb": r} for n, k, s, r in rows], "plateau": plateau,
               "checks": [{"target": w, "met": bool(ok)} for w, ok in checks], "training": training,
               "rss_samples": sampler.samples}  # fmt: skip
    out.with_suffix(".json").write_text(json.dumps(summary, indent=1))
    plot(sampler.samples, out.with_suffix(".png"))
    print("\n".join(lines))


def plot(samples, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4))
    t = [s[0] for s in samples]
    ax.plot(t, [s[1] for s in samples], lw=1.2, color="black")
    names = []
    for s in samples:
        if not names or names[-1][0] != s[2]:
            names.append([s[2], s[0], s[0]])
        names[-1][2] = s[0]
    for i, (name, a, b) in enumerate(names):
        ax.axvspan(a, b, alpha=0.12, color=f"C{i}")
        ax.text((a + b) / 2, ax.get_ylim()[1] * 0.98, name, ha="center", va="top", fontsize=8)
    ax.axhline(1536, ls="--", color="red", lw=0.8)
    ax.set_xlabel("seconds")
    ax.set_ylabel("server RSS (MB)")
    ax.set_title("moebert serve: resident memory across overload scenarios and the long-QA soak")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
