"""Load test for `minillava serve`: N concurrent `openai` clients, a bounded number of requests, on loopback.

    # start a server per mode (the CLI, in a subprocess) and compare them: continuous vs static batching vs
    # one request at a time, with mixed answer lengths and streaming (time to first token):
    python benchmarks/serve_load.py --model DIR --clients 8 --requests 64 --max-tokens 32 --mixed --stream \
        --modes continuous:8,static:8,static:1
    # the same on a tiny random model built on the spot (no downloads):
    python benchmarks/serve_load.py --tiny
    # or load a server that is already running:
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --api-key KEY

Prints one JSON object: per mode (batching:max-batch-size) the throughput (requests/s and completion tokens/s), latency
p50/p99 (and time-to-first-token p50/p99 with --stream), error count and the server's own batch statistics;
with a batch size 1 run among them, each run's throughput ratio to it. Arrivals are closed-loop (each
client sends its next request when its last one is answered) or, with `--rates`, Poisson at each rate (open loop:
requests arrive whatever is in flight, as from many users):

    python benchmarks/serve_load.py --model DIR --requests 40 --max-tokens 32 --mixed --stream --rates 0.5,1,2

With --stream each server first answers 8 requests alone: their median time to first token is the
yardstick of `ttft_p99_vs_lone`; closed loop, `ttft_steady_*` leave out each client's first request (all
clients start at once: that opening burst queues N prefills together, a state the loop never returns to).
Every request carries one image (a data: URL) and greedy decoding.
Only 127.0.0.1 is ever contacted; request count and time are bounded.
"""

from __future__ import annotations

import argparse
import base64
import importlib.util
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
import openai
from common import cpu_info
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * (len(s) - 1))))]


def image_url(seed: int) -> str:
    img = Image.new("RGB", (64, 48), ((seed * 37) % 256, (seed * 91) % 256, (seed * 53) % 256))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def run_load(url: str, api_key: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool,
             deadline_s: float, mixed: bool = False, rate: float | None = None) -> dict:  # fmt: skip
    """Closed loop (`clients` each send the next request when the last is answered) or, with `rate`, open loop:
    Poisson arrivals at `rate` requests/s (seeded), each request sent when it arrives whatever is in flight."""
    counter = iter(range(requests))
    lock = threading.Lock()
    latencies: list[float] = []
    first_tokens: list[float] = []
    steady: list[float] = []  # closed loop: TTFTs of requests that are not their client's first
    tokens = [0]
    errors: list[str] = []
    stop_at = time.monotonic() + deadline_s
    questions = ["What is in the picture?", "describe the image", "What colour is it?", "Is there a cat?"]

    def send(client: openai.OpenAI, i: int, opening: bool = True) -> None:
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_url(i)}},
            {"type": "text", "text": questions[i % len(questions)]},
        ]}]  # fmt: skip
        # mixed: one answer in four is long, the rest a quarter of it, so short ones meet long ones
        n_max = max_tokens if not mixed or i % 4 == 0 else max(1, max_tokens // 4)
        t0 = time.perf_counter()
        try:
            if stream:
                first, n = None, 0
                for chunk in client.chat.completions.create(
                    model=model, messages=messages, max_tokens=n_max, temperature=0, stream=True,
                    stream_options={"include_usage": True},
                ):  # fmt: skip
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter() - t0
                    if chunk.usage:
                        n = chunk.usage.completion_tokens
            else:
                r = client.chat.completions.create(
                    model=model, messages=messages, max_tokens=n_max, temperature=0
                )
                first, n = None, r.usage.completion_tokens
        except Exception as e:  # counted, never fatal
            with lock:
                errors.append(f"{type(e).__name__}: {e}"[:200])
            return
        with lock:
            latencies.append(time.perf_counter() - t0)
            tokens[0] += n
            if first is not None:
                first_tokens.append(first)
                if not opening:
                    steady.append(first)

    def worker() -> None:
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120)
        opening = True  # the clients' first requests arrive together, a burst the steady state never sees
        while time.monotonic() < stop_at:
            with lock:
                i = next(counter, None)
            if i is None:
                return
            send(client, i, opening)
            opening = False

    def arrivals() -> list[threading.Thread]:
        gaps = random.Random(0)
        client = openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=120,
                               http_client=httpx.Client(limits=httpx.Limits(max_connections=requests)))  # fmt: skip
        started = []
        for i in range(requests):
            time.sleep(gaps.expovariate(rate))
            if time.monotonic() >= stop_at:
                break
            started.append(threading.Thread(target=send, args=(client, i)))
            started[-1].start()
        return started

    before = httpx.get(url + "/health", timeout=10).json()
    t0 = time.perf_counter()
    if rate:
        threads = arrivals()
    else:
        threads = [threading.Thread(target=worker) for _ in range(clients)]
        for t in threads:
            t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    after = httpx.get(url + "/health", timeout=10).json()
    batches = after.get("batches", 0) - before.get("batches", 0)
    rows = after.get("rows", 0) - before.get("rows", 0)
    out = {
        "requests_ok": len(latencies),
        "errors": len(errors) + (requests - len(latencies) - len(errors)),  # unsent (deadline) count as errors
        "wall_s": round(wall, 3),
        "throughput_rps": round(len(latencies) / wall, 3),
        "completion_tokens_per_s": round(tokens[0] / wall, 1),
        "latency_p50_s": round(percentile(latencies, 50), 4),
        "latency_p99_s": round(percentile(latencies, 99), 4),
        "server_max_batch_size": after.get("max_batch_size"),
        "server_batches": batches,
        "server_mean_batch": round(rows / batches, 2) if batches else None,
        "server_batch_sizes": {
            k: v - before.get("batch_sizes", {}).get(k, 0)
            for k, v in after.get("batch_sizes", {}).items()
            if v - before.get("batch_sizes", {}).get(k, 0)
        },
    }
    if first_tokens:
        out["ttft_p50_s"] = round(percentile(first_tokens, 50), 4)
        out["ttft_p99_s"] = round(percentile(first_tokens, 99), 4)
    if steady and not rate:
        out["ttft_steady_p50_s"] = round(percentile(steady, 50), 4)
        out["ttft_steady_p99_s"] = round(percentile(steady, 99), 4)
    if errors:
        out["error_samples"] = sorted(set(errors))[:5]
    return out


def plot(runs: list[dict], path: Path) -> None:
    """Time to first token (p50, p99) and end-to-end p99 against the arrival rate, one line per server mode."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ttft, e2e) = plt.subplots(1, 2, figsize=(10, 3.8))
    for mode in dict.fromkeys((r["batching"], r["max_batch_size"]) for r in runs):
        rows = sorted((r for r in runs if (r["batching"], r["max_batch_size"]) == mode), key=lambda r: r["rate_rps"])
        rates, label = [r["rate_rps"] for r in rows], f"{mode[0]}, batch {mode[1]}"
        line = ttft.plot(rates, [r["ttft_p99_s"] for r in rows], marker="o", label=f"{label}: p99")[0]
        ttft.plot(rates, [r["ttft_p50_s"] for r in rows], marker=".", ls="--", color=line.get_color(), label="p50")
        e2e.plot(rates, [r["latency_p99_s"] for r in rows], marker="o", color=line.get_color(), label=label)
    lone = [r["lone_ttft_s"] for r in runs if r.get("lone_ttft_s")]
    if lone:
        ttft.axhline(2 * min(lone), color="grey", lw=0.8, ls=":", label="2 x a lone request")
    ttft.set(xlabel="arrivals (requests/s, Poisson)", ylabel="time to first token (s)", yscale="log")
    e2e.set(xlabel="arrivals (requests/s, Poisson)", ylabel="end-to-end latency p99 (s)", yscale="log")
    ttft.legend(fontsize=7)
    e2e.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m minillava.serve.cli serve ...` on a free loopback port."""

    def __init__(
        self, model: str, batch_size: int, threads: int | None, log: Path, wait_ms: float | None = None,
        batching: str = "continuous", dtype: str = "float32",
    ) -> None:  # fmt: skip
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "minillava.serve.cli", "serve", "--model", model, "--host", "127.0.0.1",
               "--port", str(self.port), "--max-batch-size", str(batch_size), "--served-model-name", "bench",
               "--log-level", "warning", "--device", "cpu", "--batching", batching, "--dtype", dtype]  # fmt: skip
        if threads:
            cmd += ["--threads", str(threads)]
        if wait_ms is not None:
            cmd += ["--batch-wait-ms", str(wait_ms)]
        self.log = log.open("w")
        env = {**os.environ, "MINILLAVA_API_KEY": ""}
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env, cwd=REPO)

    def __enter__(self) -> ServerProcess:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.__exit__()
        raise RuntimeError("server did not come up in 180 s")

    def __exit__(self, *exc) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


def build_tiny(directory: Path) -> Path:
    """The test suite's tiny random CLIP + Llama model (tests/tiny_models.py), saved as a minillava dir."""
    # The tokenizer trainer (Rust) draws progress on fd 1; keep stdout for the JSON alone.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        return _build_tiny(directory)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def _build_tiny(directory: Path) -> Path:
    import torch

    from minillava.config import ModelConfig, ProjectorConfig, VisionConfig
    from minillava.model import MiniLlava

    spec = importlib.util.spec_from_file_location("tiny_models", REPO / "tests" / "tiny_models.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)  # type: ignore[union-attr]
    (directory / "llm").mkdir(parents=True)
    (directory / "vision").mkdir()
    tiny.make_llm(directory / "llm", "llama")
    tiny.make_vision(directory / "vision", "clip")
    cfg = ModelConfig(
        vision=VisionConfig(source=str(directory / "vision")), projector=ProjectorConfig(name="mlp2x_gelu"),
        llm_source=str(directory / "llm"),
    )  # fmt: skip
    torch.manual_seed(2)
    model, processor = MiniLlava.build(cfg)
    model.save_pretrained(directory / "model", processor)
    return directory / "model"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model directory: start `minillava serve` for each --batch-sizes entry")
    src.add_argument("--tiny", action="store_true", help="build the test suite's tiny random model and use it")
    src.add_argument("--url", help="an already running server (only 127.0.0.1 / localhost)")
    p.add_argument("--api-key", default="none")
    p.add_argument("--served-model", default=None, help="model id for --url (default: the first /v1/models entry)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument(
        "--modes", default="continuous:8,static:8,static:1",
        help="servers to compare, BATCHING:MAX_BATCH_SIZE each (ignored with --url)",
    )  # fmt: skip
    p.add_argument("--mixed", action="store_true", help="mixed answer lengths: 1 in 4 long, the rest 1/4 of it")
    p.add_argument("--threads", type=int, default=None, help="torch threads for each server (default: torch's)")
    p.add_argument("--batch-wait-ms", type=float, default=None, help="the servers' --batch-wait-ms (default: theirs)")
    p.add_argument("--dtype", default="float32", help="the servers' --dtype (auto: bf16 where it is fast)")
    p.add_argument("--stream", action="store_true", help="stream the answers (adds time-to-first-token)")
    p.add_argument("--deadline-s", type=float, default=300, help="stop sending after this long, per run")
    p.add_argument("--rates", default=None, metavar="R,...",
                   help="open loop: Poisson arrivals at each rate (requests/s) instead of --clients")  # fmt: skip
    p.add_argument("--plot", default=None, metavar="PNG", help="with --rates and --stream: plot latency against rate")
    args = p.parse_args(argv)
    if args.clients < 1 or args.requests < 1 or args.max_tokens < 1:
        p.error("--clients, --requests and --max-tokens must be positive")

    try:
        rates = [float(r) for r in args.rates.split(",")] if args.rates else [None]
    except ValueError:
        p.error("--rates takes requests/s numbers, e.g. 0.5,1,2")
    if any(r is not None and r <= 0 for r in rates):
        p.error("--rates must be positive")
    keys = ("clients", "requests", "max_tokens", "mixed", "stream", "threads", "batch_wait_ms", "dtype", "rates")
    config = {k: getattr(args, k) for k in keys} | cpu_info()
    if args.url:
        host = httpx.URL(args.url).host
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url must point at this machine (127.0.0.1 / localhost)")
        headers = {"Authorization": f"Bearer {args.api_key}"}
        model = args.served_model or httpx.get(args.url + "/v1/models", headers=headers).json()["data"][0]["id"]
        result = run_load(args.url.rstrip("/"), args.api_key, model, args.clients, args.requests, args.max_tokens,
                          args.stream, args.deadline_s, args.mixed)  # fmt: skip
        print(json.dumps({"config": {**config, "url": args.url}, "runs": [result]}, indent=2))
        return 0 if result["errors"] == 0 else 1

    try:
        modes = [(m.split(":")[0], int(m.split(":")[1])) for m in args.modes.split(",") if m.strip()]
    except (IndexError, ValueError):
        p.error("--modes takes BATCHING:SIZE entries, e.g. continuous:8,static:8,static:1")
    if any(b not in ("continuous", "static") or n < 1 for b, n in modes):
        p.error("--modes: BATCHING is continuous or static, SIZE at least 1")
    with tempfile.TemporaryDirectory(prefix="serve-load-") as tmp:
        model_dir = str(build_tiny(Path(tmp) / "tiny")) if args.tiny else args.model
        runs = []
        for batching, size in modes:
            log = Path(tmp) / f"server-{batching}-{size}.log"
            with ServerProcess(model_dir, size, args.threads, log, args.batch_wait_ms, batching, args.dtype) as server:
                run_load(server.url, "none", "bench", 1, 2, args.max_tokens, False, 60)  # warm-up
                lone = None
                if args.stream:  # the yardstick: one request alone, nothing else in flight
                    lone = run_load(server.url, "none", "bench", 1, 8, args.max_tokens, True, 60).get("ttft_p50_s")
                for rate in rates:
                    run = run_load(server.url, "none", "bench", args.clients, args.requests, args.max_tokens,
                                   args.stream, args.deadline_s, args.mixed, rate)  # fmt: skip
                    if lone:
                        run |= {"lone_ttft_s": lone, "ttft_p99_vs_lone": round(run["ttft_p99_s"] / lone, 2)}
                        if "ttft_steady_p99_s" in run:
                            run["ttft_steady_p99_vs_lone"] = round(run["ttft_steady_p99_s"] / lone, 2)
                    runs.append({"batching": batching, "max_batch_size": size, "dtype": args.dtype, "rate_rps": rate,
                                 **run})  # fmt: skip
    for r in runs:  # against the batch-1 server at the same arrival rate
        base = next((b for b in runs if b["max_batch_size"] == 1 and b["rate_rps"] == r["rate_rps"]), None)
        if base and base["throughput_rps"]:
            r["throughput_vs_batch_1"] = round(r["throughput_rps"] / base["throughput_rps"], 2)
    print(json.dumps({"config": {**config, "model": "tiny" if args.tiny else args.model}, "runs": runs}, indent=2))
    if args.plot and args.rates and args.stream:
        plot(runs, Path(args.plot))
    return 0 if all(r["errors"] == 0 for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
