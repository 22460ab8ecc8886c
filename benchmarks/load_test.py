"""Load benchmark: async HTTP load against this service and the baselines, side by side in one run.

Each configuration is started as its own process on a free 127.0.0.1 port, loaded, then stopped:
- moebert-torch / moebert-onnx-fp32 / moebert-onnx-int8: this service serving the MoEBERT classifier;
- dense-torch / dense-onnx-fp32 / dense-onnx-int8: this service serving the dense teacher; each pair on
  one backend is also reported as a "MoEBERT vs dense, same backend" row (target: MoE ≥ 1.4× req/s,
  p99 no worse);
- naive: a FastAPI app that calls transformers' text-classification pipeline one request at a time;
- infinity: Infinity (`infinity_emb v2 --engine torch`) serving the same dense teacher, from its own
  virtualenv (--infinity-venv; skipped when absent). Install:
    python3 -m venv VENV && VENV/bin/pip install "infinity-emb[server,torch]==0.0.78" "torch==2.13.0"

Load (benchmarks/load_clients.py: raw keep-alive HTTP/1.1, requests encoded before the run, so the load
generator takes as little of the shared cores as it can): closed loop (C clients, each sending its next
request when the last one is answered) and open loop (requests sent at a fixed rate, latency counted from
the scheduled send time, so a slow server cannot hide its queueing), each bounded in time. Every server is
started first; each measurement then runs as --rounds windows, round-robin over the configurations, so the
MoE and dense rows of one backend see the same machine. --client-nice lowers the load generator below the
servers' inference threads (nice 10), as a client on another machine would not compete at all. One SST-2 dev
sentence per classification request, one SQuAD dev question/context per QA request. Reports throughput and
p50/p95/p99 latency; writes a Markdown table, JSON and a PNG under benchmarks/results/.

    python benchmarks/load_test.py --moe runs/minilm-cls-moe --dense runs/minilm-cls --duration 20
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from load_clients import Result, Tally, closed_loop, encode_requests, open_loop
from pydantic import BaseModel
from results_files import pyplot
from tqdm import tqdm

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = Path(os.environ.get("MOEBERT_DATA", REPO.parent / "shared" / "data"))
RESULTS = REPO / "benchmarks" / "results"


# --------------------------------------------------------------------------------------------------
# Payloads


def sst2_sentences(limit: int | None = None) -> list[str]:
    """SST-2 dev sentences; where the task data is not there (a GPU machine), seeded sentences of SST-2-like
    length (5-40 words) from a fixed vocabulary, said on stderr."""
    path = DATA / "glue" / "SST-2" / "dev.tsv"
    if not path.is_file():
        print(f"no {path}: sending synthetic sentences of 5-40 words", file=sys.stderr)
        rng = random.Random(0)
        words = ["the", "film", "is", "a", "charming", "witty", "bleak", "movie", "whose", "plot", "and",
                 "characters", "never", "come", "alive", "but", "often", "move"]  # fmt: skip
        return [" ".join(rng.choice(words) for _ in range(rng.randint(5, 40))) for _ in range(limit or 872)]
    with open(path, newline="") as f:
        rows = [r["sentence"] for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit] if limit else rows


def squad_pairs(limit: int = 2000) -> list[tuple[str, str]]:
    data = json.loads((DATA / "squad" / "dev-v1.1.json").read_text())["data"]
    pairs = [(qa["question"], p["context"]) for art in data for p in art["paragraphs"] for qa in p["qas"]]
    return pairs[:limit]


# --------------------------------------------------------------------------------------------------
# Targets: how to start each server and what one request looks like


@dataclass
class Target:
    name: str
    url: str
    path: str
    body: callable  # payload → JSON body
    proc: object = None


def classify_body(model: str):
    return lambda text: {"inputs": text, "model": model}


def qa_body(model: str):
    return lambda pair: {"question": pair[0], "context": pair[1], "model": model}


def start_moebert(name: str, models: dict[str, str], flags: list[str], log_dir: Path):
    from server_process import ServerProcess

    log = open(log_dir / f"{name}.log", "w")  # noqa: SIM115 (closed when the process ends)
    return ServerProcess(models, *flags, log=log).start(timeout_s=300)


class ChildServer:
    """Any other server command, ready when `ready_path` answers 200."""

    def __init__(self, args: list[str], port: int, ready_path: str, log_path: Path, env=None):
        import subprocess

        self.url = f"http://127.0.0.1:{port}"
        self.log = open(log_path, "w")  # noqa: SIM115
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        self.ready_path = ready_path

    def start(self, timeout_s: float = 600) -> ChildServer:
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"not ready after {timeout_s} s; see {self.log.name}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except Exception:
            self.proc.kill()


class NaiveBody(BaseModel):
    inputs: str
    model: str | None = None


def naive_app(model_path: str):
    """The baseline: transformers' pipeline, one request at a time (a lock around the model)."""
    import threading

    from fastapi import FastAPI
    from transformers import pipeline

    clf = pipeline("text-classification", model=model_path, device="cpu")
    lock = threading.Lock()
    app = FastAPI()

    @app.post("/v1/classify")
    def classify(body: NaiveBody):  # a sync endpoint: FastAPI runs it in its thread pool
        with lock:
            return clf(body.inputs)

    @app.get("/health")
    def health():
        return {"ok": True}

    return app


# --------------------------------------------------------------------------------------------------
# The run


def configurations(args) -> list[tuple[str, callable]]:
    """(name, start() → (server, Target)) for every configuration asked for."""
    import tempfile

    from server_process import free_port

    log_dir = Path(tempfile.mkdtemp(prefix="moebert-load-test-"))  # server logs: kept out of the repository
    print(f"server logs: {log_dir}", file=sys.stderr)
    threads = ["--threads", str(args.threads)] if args.threads else []
    device = ["--device", args.device] if args.device != "cpu" else []  # cuda: auto dtype, CUDA graphs
    if args.max_seq_len:  # also bounds the CUDA-graph buckets captured at start-up
        device += ["--max-seq-len", str(args.max_seq_len)]
    knobs = ["--max-wait-ms", str(args.max_wait_ms), "--max-queue", "4096"]
    if args.max_batch_tokens:
        knobs += ["--max-batch-tokens", str(args.max_batch_tokens)]
    if args.int8_matmul:
        knobs += ["--int8-matmul", args.int8_matmul]

    def ours(name, path, backend_flags, task="classification"):
        def start():
            proc = start_moebert(name, {"m": path}, [*backend_flags, *device, *threads, *knobs], log_dir)
            body = classify_body("m") if task == "classification" else qa_body("m")
            return proc, Target(name, proc.url, "/v1/classify" if task == "classification" else "/v1/qa", body)

        return start

    def naive():
        port = free_port()
        cmd = [sys.executable, __file__, "--naive-server", args.dense, "--port", str(port)]
        env = {"OMP_NUM_THREADS": str(args.threads or os.cpu_count())}
        proc = ChildServer(cmd, port, "/health", log_dir / "naive.log", env).start()
        return proc, Target("naive", proc.url, "/v1/classify", lambda text: {"inputs": text})

    def infinity():
        port = free_port()
        binary = Path(args.infinity_venv) / "bin" / "infinity_emb"
        model = str(Path(args.dense).resolve())
        cmd = [str(binary), "v2", "--engine", "torch", "--model-id", model, "--port", str(port), "--host", "127.0.0.1",
               "--served-model-name", "dense", "--device", "cpu", "--no-bettertransformer"]  # fmt: skip
        env = {"INFINITY_ANONYMOUS_USAGE_STATS": "0", "OMP_NUM_THREADS": str(args.threads or os.cpu_count())}
        proc = ChildServer(cmd, port, "/health", log_dir / "infinity.log", env)
        proc.start()
        return proc, Target("infinity", proc.url, "/classify", lambda text: {"input": [text], "model": "dense"})

    table = {
        "moebert-torch": ours("moebert-torch", args.moe, ["--backend", "torch"]),
        "moebert-onnx-fp32": ours("moebert-onnx-fp32", args.moe, ["--backend", "onnx", "--onnx-precision", "fp32"]),
        "moebert-onnx-int8": ours("moebert-onnx-int8", args.moe, ["--backend", "onnx", "--onnx-precision", "int8"]),
        "dense-torch": ours("dense-torch", args.dense, ["--backend", "torch"]),
        "dense-onnx-fp32": ours("dense-onnx-fp32", args.dense, ["--backend", "onnx", "--onnx-precision", "fp32"]),
        "dense-onnx-int8": ours("dense-onnx-int8", args.dense, ["--backend", "onnx", "--onnx-precision", "int8"]),
        "naive": naive,
        "infinity": infinity,
    }
    if args.qa:
        table["moebert-qa-onnx-int8"] = ours(
            "moebert-qa-onnx-int8", args.qa, ["--backend", "onnx", "--onnx-precision", "int8"], "qa"
        )
        if args.qa_dense:
            table["dense-qa-onnx-int8"] = ours(
                "dense-qa-onnx-int8", args.qa_dense, ["--backend", "onnx", "--onnx-precision", "int8"], "qa"
            )
        table["moebert-qa-torch-bf16"] = ours(  # a QA checkpoint with torch weights, on the bf16 runtime
            "moebert-qa-torch-bf16", args.qa, ["--backend", "torch", "--dtype", "bfloat16"], "qa"
        )
    chosen = []
    for name in args.configs:
        if name == "infinity" and not (Path(args.infinity_venv) / "bin" / "infinity_emb").exists():
            print(f"skipping infinity: no {args.infinity_venv}/bin/infinity_emb", file=sys.stderr)
            continue
        if (name.startswith("moebert-qa") and not args.qa) or (name.startswith("dense-qa") and not args.qa_dense):
            continue
        chosen.append((name, table[name]))
    return chosen


def run(args) -> list[Result]:
    """Every configuration's server is started first and stays up; then each measurement (configuration ×
    load) runs as `--rounds` windows, round-robin over the configurations, so that the machine's drift
    (this box is noisy) falls on all of them alike and their ratios compare like with like."""
    sentences = sst2_sentences()
    pairs = squad_pairs() if args.qa else []
    started: list[tuple[str, object, Target, list[bytes]]] = []
    results: list[Result] = []
    try:
        for name, start in configurations(args):
            print(f"== starting {name}", file=sys.stderr, flush=True)
            try:
                proc, target = start()
            except Exception as err:  # one configuration failing to start must not lose the others
                print(f"   could not start: {err}", file=sys.stderr)
                results.append(Result(name, "not started", 0, errors={"start": str(err)[:200]}))
                continue
            payloads = pairs if target.path == "/v1/qa" else sentences
            requests = encode_requests(target.url, target.path, [target.body(p) for p in payloads])
            asyncio.run(closed_loop(target.url, requests, 4, min(3.0, args.duration), Tally()))  # warm-up
            started.append((name, proc, target, requests))
        if args.client_nice:
            os.nice(args.client_nice)  # after the servers started: they keep their priority
        tallies: dict[tuple[str, str, float], Tally] = {}  # (configuration, "closed"/"open", clients/rate)
        for name, _, target, _ in started:
            rates = args.qa_rates if target.path == "/v1/qa" else args.rates
            for kind, x in [*(("closed", c) for c in args.concurrency), *(("open", r) for r in rates)]:
                tallies[name, kind, x] = Tally()
        window = args.duration / args.rounds
        for k in tqdm(range(args.rounds), desc="rounds", file=sys.stderr):
            for name, _, target, requests in started:
                for (cname, kind, x), tally in tallies.items():
                    if cname != name:
                        continue
                    loop = closed_loop if kind == "closed" else open_loop
                    asyncio.run(loop(target.url, requests, x, window, tally, seed=k))
        for (name, kind, x), tally in tallies.items():
            results.append(tally.result(name, f"closed c={x}" if kind == "closed" else f"open {x:g}/s"))
            print(f"   {results[-1]}", file=sys.stderr, flush=True)
    finally:
        for _, proc, _, _ in started:
            proc.stop()
    return results


def write_report(results: list[Result], args) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    lines = [
        "# Load test",
        "",
        f"`python benchmarks/load_test.py {' '.join(sys.argv[1:])}`",
        "",
        f"Machine: {os.cpu_count()} CPU cores, load generator on the same machine. One SST-2 dev sentence per "
        f"request (QA: one SQuAD dev question/context). {args.duration:g} s per measurement; open-loop latency "
        "counts from the scheduled send time.",
        "",
        "| configuration | load | req/s | p50 ms | p95 ms | p99 ms | errors |",
        "|---|---|---:|---:|---:|---:|---|",
    ]
    for r in results:
        errors = ", ".join(f"{k}: {v}" for k, v in r.errors.items()) or ""
        lines.append(f"| {r.config} | {r.mode} | {r.throughput} | {r.p50_ms} | {r.p95_ms} | {r.p99_ms} | {errors} |")
    pairs = moe_vs_dense(results)
    if pairs:
        lines += [
            "",
            f"## MoEBERT vs its dense teacher, same backend (closed loop; target: ≥ {MOE_TARGET}× req/s, p99 no worse)",
            "",
            "| backend | load | MoE req/s | dense req/s | req/s ratio | MoE p99 ms | dense p99 ms | met |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for backend, mode, moe, dense in pairs:
            ratio = moe.throughput / dense.throughput if dense.throughput else float("nan")
            met = "yes" if ratio >= MOE_TARGET and moe.p99_ms <= dense.p99_ms else "**no**"
            lines.append(f"| {backend} | {mode} | {moe.throughput} | {dense.throughput} | {ratio:.2f}× "
                         f"| {moe.p99_ms} | {dense.p99_ms} | {met} |")  # fmt: skip
    (RESULTS / f"{args.name}.md").write_text("\n".join(lines) + "\n")
    plt = pyplot()
    if plt is None:
        return
    closed = [r for r in results if r.mode.startswith("closed") and r.ok]
    if not closed:
        return
    labels = [f"{r.config}\n{r.mode}" for r in closed]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(closed)), 4.5))
    ax1.bar(range(len(closed)), [r.throughput for r in closed], color="tab:blue")
    ax1.set_title("throughput (req/s)")
    ax2.bar(range(len(closed)), [r.p99_ms for r in closed], color="tab:red")
    ax2.set_title("p99 latency (ms)")
    for ax in (ax1, ax2):
        ax.set_xticks(range(len(closed)), labels, rotation=60, ha="right", fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / f"{args.name}.png", dpi=120)


MOE_TARGET = 1.4  # served MoEBERT req/s over its dense teacher's, same backend and load


def moe_vs_dense(results: list[Result]) -> list[tuple[str, str, Result, Result]]:
    """(backend, load, MoE result, dense result) for every closed-loop load both ran on one backend."""
    by_name = {(r.config, r.mode): r for r in results if r.mode.startswith("closed") and r.ok}
    pairs = []
    for (config, mode), moe in by_name.items():
        if config.startswith("moebert-"):
            backend = config.removeprefix("moebert-")  # "qa-onnx-int8" pairs with dense-qa-onnx-int8
            dense = by_name.get((f"dense-{backend}", mode))
            if dense is not None:
                pairs.append((backend, mode, moe, dense))
    return pairs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--moe", default="runs/minilm-cls-moe", help="MoEBERT classifier (with onnx/ exported)")
    p.add_argument("--dense", default="runs/minilm-cls", help="its dense teacher (with onnx/ exported)")
    p.add_argument("--qa", help="a QA checkpoint (with onnx/) to load /v1/qa with SQuAD dev pairs")
    p.add_argument("--qa-dense", help="its dense QA teacher (with onnx/): the dense-qa-onnx-int8 configuration")
    p.add_argument("--configs", nargs="+", default=["moebert-torch", "moebert-onnx-fp32", "moebert-onnx-int8",
                   "dense-torch", "naive", "infinity", "moebert-qa-onnx-int8"])  # fmt: skip
    p.add_argument("--concurrency", type=int, nargs="*", default=[16], help="closed-loop clients (default 16)")
    p.add_argument("--rates", type=float, nargs="*", default=[], help="open-loop request rates (req/s)")
    p.add_argument("--qa-rates", type=float, nargs="*", default=[], help="open-loop rates for the QA configuration")
    p.add_argument("--duration", type=float, default=20.0, help="seconds per measurement (default 20)")
    p.add_argument(
        "--rounds",
        type=int,
        default=4,
        help="each measurement runs as this many windows, interleaved across configurations (default 4)",
    )
    p.add_argument("--client-nice", type=int, default=0,
                   help="lower this load generator's CPU priority by this much (Linux nice) once the servers are up: "
                        "it shares their cores, where a remote client would not (default 0)")  # fmt: skip
    p.add_argument("--threads", type=int, default=1, help="inference threads of each server (default 1)")
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                   help="this service's device (cuda: with --configs moebert-torch dense-torch)")  # fmt: skip
    p.add_argument("--max-wait-ms", type=float, default=2.0, help="this service's batching wait")
    p.add_argument("--max-seq-len", type=int, help="this service's tokens per row (default: the model's)")
    p.add_argument("--max-batch-tokens", type=int, help="this service's padded tokens per batch (default: its own)")
    p.add_argument("--int8-matmul", choices=["exact", "fast"],
                   help="this service's int8 products on CPUs without VNNI (default: its own, exact)")  # fmt: skip
    p.add_argument("--infinity-venv", default=os.environ.get("INFINITY_VENV", ".venv-infinity"))
    p.add_argument("--name", default="load_test", help="results file stem under benchmarks/results (default load_test)")
    p.add_argument("--naive-server", metavar="MODEL", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.naive_server:  # the baseline, in its own process
        import uvicorn

        uvicorn.run(naive_app(args.naive_server), host="127.0.0.1", port=args.port, log_level="warning")
        return 0
    write_report(run(args), args)
    print((RESULTS / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
