"""Load on `polytask serve`: throughput, latency, errors and memory under concurrent clients.

For the students CSV recipe and the text recipe, a real server (`polytask serve` in a
subprocess: uvicorn, one worker, the PyTorch engine, one torch thread) is started and N
concurrent clients (1, 8, 64; each sends one-row `POST /predict` requests back to back over a
keep-alive connection) send REQUESTS requests in all. The table gives requests/s, rows/s, p50,
p95 and p99 latency, the number of errors (any answer but 200), and the server's RSS before
(after a warm-up) and after the requests.

Micro-batching against one-request-one-forward (`--max-batch 1`) at 64 clients: both servers
run side by side and are loaded in turn, ROUNDS times each, interleaved; the table gives each
round's throughput and the ratio of the medians.

The clients are a minimal asyncio HTTP/1.1 client (pre-encoded requests, keep-alive) rather
than httpx, so that on a small machine the load generator takes little of the CPU the server
needs.

    python benchmarks/serve_load.py [--requests 10000] [--rounds 9] [--runs DIR]

Runs are trained first into DIR (default: a temporary folder): the CSV recipe as shipped, the
text recipe with fewer epochs (the model, and so the cost of serving it, is the recipe's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from polytask.io import write_text_atomic

RESULTS = Path(__file__).parent / "results"
CLIENTS = (1, 8, 64)
#: one input row per recipe: the first row of the students example, a review
ROWS = {
    "students-csv": {
        "hours_studied": 12.5,
        "sleep_hours": 5.27,
        "absences": 6,
        "prior_score": 67.6,
    },
    "text-two-task": {"text": "the pasta was great but the service was painfully slow"},
}
TRAIN = {
    "students-csv": [],
    "text-two-task": ["train.epochs=2"],
}


@dataclass
class Load:
    """What N clients measured."""

    clients: int
    requests: int
    seconds: float
    latencies_ms: list[float]
    errors: int

    @property
    def per_second(self) -> float:
        return self.requests / self.seconds

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if self.latencies_ms else float("nan")


# ---------------------------------------------------------------------- server
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Server:
    """`polytask serve RUN_DIR` in a subprocess, on a free port."""

    def __init__(self, run_dir: Path, *extra: str) -> None:
        self.port = free_port()
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        command = [sys.executable, "-m", "polytask", "serve", str(run_dir), "--port",
                   str(self.port), "--log-level", "warning", *extra]  # fmt: skip
        self.process = subprocess.Popen(
            command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 120
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not start: {' '.join(command)}")
            time.sleep(0.2)

    def _healthy(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(64).startswith(b"HTTP/1.1 200")
        except OSError:
            return False

    def rss_mib(self) -> float:
        """The server process's resident set size (Linux: /proc)."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def cpu_seconds(self) -> float:
        """User + system CPU time the server process has used (Linux: /proc)."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


# ---------------------------------------------------------------------- clients
def encode_request(row: dict[str, object]) -> bytes:
    body = json.dumps({"rows": [row]}).encode()
    head = (
        "POST /predict HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


async def connect(port: int, request: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A keep-alive connection that has answered one request (so that setting up connections,
    which a client's pool does once, is not timed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await exchange(reader, writer, request)
    return reader, writer


async def exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes
) -> bool:
    """Send ``request``, read the answer; whether it is a 200 with predictions."""
    writer.write(request)
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    body = await reader.readexactly(length)
    return head.startswith(b"HTTP/1.1 200") and b'"predictions"' in body


async def client(
    connection: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    request: bytes,
    count: list[int],
    out: list[float],
) -> int:
    """Send requests back to back while ``count[0]`` > 0; latencies (ms) go to ``out``;
    returns the number of errors."""
    reader, writer = connection
    errors = 0
    try:
        while count[0] > 0:
            count[0] -= 1
            start = time.perf_counter()
            ok = await exchange(reader, writer, request)
            out.append((time.perf_counter() - start) * 1000)
            errors += not ok
    finally:
        writer.close()
    return errors


async def load(port: int, request: bytes, clients: int, requests: int) -> Load:
    connections = await asyncio.gather(*[connect(port, request) for _ in range(clients)])
    count, latencies = [requests], []
    start = time.perf_counter()
    errors = await asyncio.gather(*[client(c, request, count, latencies) for c in connections])
    return Load(clients, requests, time.perf_counter() - start, latencies, sum(errors))


def run_load(server: Server, request: bytes, clients: int, requests: int) -> Load:
    return asyncio.run(load(server.port, request, clients, requests))


# ---------------------------------------------------------------------- the benchmark
def train_runs(runs: Path) -> dict[str, Path]:
    """The run folder of each recipe under ``runs`` (trained when missing)."""
    folders = {}
    for recipe, overrides in TRAIN.items():
        out = runs / recipe
        if not out.exists() or not any(out.glob("*/checkpoints/best.safetensors")):
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "polytask",
                    "train",
                    recipe,
                    f"output_dir={out}",
                    "--no-progress",
                    *overrides,
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
        (folders[recipe],) = sorted(out.glob("*/checkpoints/best.safetensors"))[:1]
        folders[recipe] = folders[recipe].parents[1]
    return folders


def clients_table(recipe: str, run_dir: Path, requests: int) -> list[str]:
    """One line per number of clients, micro-batching on (the defaults)."""
    request = encode_request(ROWS[recipe])
    server = Server(run_dir)
    lines = []
    try:
        run_load(server, request, 8, 500)  # warm-up
        for clients in CLIENTS:
            before, cpu = server.rss_mib(), server.cpu_seconds()
            result = run_load(server, request, clients, requests)
            after, cpu = server.rss_mib(), server.cpu_seconds() - cpu
            lines.append(
                f"| {recipe} | {clients} | {result.per_second:,.0f} | {result.per_second:,.0f} | "
                f"{result.percentile(50):.1f} | {result.percentile(95):.1f} | "
                f"{result.percentile(99):.1f} | {result.errors} | "
                f"{1000 * cpu / requests:.2f} | {before:.0f} → {after:.0f} "
                f"({100 * (after - before) / before:+.1f}%) |"
            )
            print(lines[-1], flush=True)
    finally:
        server.stop()
    return lines


def batching_table(recipe: str, run_dir: Path, requests: int, rounds: int) -> list[str]:
    """Micro-batching against ``--max-batch 1`` at 64 clients, interleaved rounds."""
    request = encode_request(ROWS[recipe])
    servers = {
        "micro-batching": Server(run_dir),
        "max batch 1": Server(run_dir, "--max-batch", "1"),
    }
    rates: dict[str, list[float]] = {name: [] for name in servers}
    cpu: dict[str, list[float]] = {name: [] for name in servers}
    p99: dict[str, list[float]] = {name: [] for name in servers}
    errors = dict.fromkeys(servers, 0)
    try:
        for server in servers.values():
            run_load(server, request, 8, 300)  # warm-up
        for _ in range(rounds):
            for name, server in servers.items():
                used = server.cpu_seconds()
                result = run_load(server, request, 64, requests)
                cpu[name].append(1000 * (server.cpu_seconds() - used) / requests)
                rates[name].append(result.per_second)
                p99[name].append(result.percentile(99))
                errors[name] += result.errors
    finally:
        for server in servers.values():
            server.stop()
    ratio = statistics.median(rates["micro-batching"]) / statistics.median(rates["max batch 1"])
    paired = statistics.median(
        b / one for b, one in zip(rates["micro-batching"], rates["max batch 1"], strict=True)
    )
    lines = [
        f"| {recipe} | {name} | {', '.join(f'{r:,.0f}' for r in rates[name])} | "
        f"{statistics.median(rates[name]):,.0f} | {statistics.median(p99[name]):.1f} | "
        f"{statistics.median(cpu[name]):.2f} | {errors[name]} |"
        for name in servers
    ]
    saving = statistics.median(cpu["max batch 1"]) / statistics.median(cpu["micro-batching"])
    lines.append(
        f"| {recipe} | **ratio** (batching / max batch 1) | median of the rounds' ratios: "
        f"{paired:.2f}× | **{ratio:.2f}×** | | **{saving:.2f}× less** | |"
    )
    for line in lines:
        print(line, flush=True)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=10_000, help="requests per measurement")
    parser.add_argument("--rounds", type=int, default=9, help="interleaved rounds (batching)")
    parser.add_argument("--batch-requests", type=int, default=2_000, help="requests per round")
    parser.add_argument("--runs", type=Path, default=None, help="where the runs are trained")
    parser.add_argument("--output", type=Path, default=RESULTS / "serve_load.md")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        runs = train_runs(args.runs or Path(scratch))
        header = [
            "| recipe | clients | requests/s | rows/s | p50 ms | p95 ms | p99 ms | errors | "
            "server CPU ms/request | server RSS MiB before → after |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        print("\n".join(header))
        load_lines = [
            line for r, path in runs.items() for line in clients_table(r, path, args.requests)
        ]
        batch_header = [
            "| recipe | server | requests/s per round | median | p99 ms (median) | "
            "server CPU ms/request (median) | errors |",
            "|---|---|---|---:|---:|---:|---:|",
        ]
        print("\n".join(batch_header))
        batch_lines = [
            line
            for r, path in runs.items()
            for line in batching_table(r, path, args.batch_requests, args.rounds)
        ]
    cpus = os.cpu_count()
    text = "\n".join(
        [
            "# Serving load (`benchmarks/serve_load.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on "
            f"{platform.machine()}, {cpus} CPU cores **shared with other engineers' jobs while "
            f"this ran** (load average {os.getloadavg()[0]:.1f} at the end; the load generator "
            "runs on the same cores as the server); "
            f"Python {platform.python_version()}. Server: `polytask serve` (uvicorn, 1 worker, "
            "PyTorch engine, `OMP_NUM_THREADS=1`), defaults `--max-batch 64 --max-wait-ms 2`. "
            "Each client sends one-row `POST /predict` requests back to back over a keep-alive "
            f"connection; {args.requests:,} requests per line (after 500 warm-up requests), so "
            "requests/s = rows/s. RSS is the server's, before and after each line's requests; "
            "server CPU is the server process's user + system time divided by the requests (it "
            "does not depend on how busy the other jobs keep the cores, the wall-clock figures "
            "do).",
            "",
            *header,
            *load_lines,
            "",
            f"Micro-batching against one-request-one-forward (`--max-batch 1`) at 64 clients: "
            f"both servers up, loaded in turn, {args.rounds} interleaved rounds of "
            f"{args.batch_requests:,} requests each.",
            "",
            *batch_header,
            *batch_lines,
            "",
        ]
    )
    write_text_atomic(args.output, text)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
