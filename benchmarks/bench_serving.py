"""Load benchmark of ``dualtoken serve``: N concurrent clients on loopback, micro-batching on vs off, one run.

The server is ``dualtoken serve`` in a subprocess, bound to 127.0.0.1 on a free port; the clients are asyncio
tasks (httpx) in this process that each send one request at a time, back to back, for a bounded time. For every concurrency level
and both modes the script prints images/s, p50 / p99 latency and the mean batch size the server formed, then the
throughput ratio batching-on / batching-off.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py --clients 1 4 16 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from io import BytesIO
from pathlib import Path

import httpx
import torch
from PIL import Image

from dualtoken.io import load_image, to_uint8

KODAK = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "kodak" / "kodim23.png"
MAX_CLIENTS = 64
MAX_SECONDS = 60.0


def photo_png(path: Path | None, size: tuple[int, int]) -> bytes:
    """A real photo as PNG bytes at the model's input size (clients send what the model takes)."""
    if path is None and KODAK.is_file():
        path = KODAK
    if path is not None:
        tensor = load_image(path, size=size)
    else:
        from skimage import data

        tensor = load_image(BytesIO(_png(data.astronaut())), size=size)
    return _png(to_uint8(tensor))


def _png(pixels) -> bytes:
    buffer = BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class Server:
    """``dualtoken serve`` in a subprocess on 127.0.0.1 and a free port (clients and server do not share a GIL)."""

    def __init__(self, model: str, max_batch: int, max_wait_ms: float, threads: int) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable, "-m", "dualtoken", "serve", "--model", model, "--port", str(self.port),
            "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(MAX_CLIENTS),
            "--threads", str(threads), "--log-level", "warning",
        ]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        self.process = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dualtoken serve exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)
                return self
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError("dualtoken serve did not come up in 120 s") from None
                time.sleep(0.25)

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(30)

    def model_calls(self, endpoint: str) -> int:
        """How many model calls the endpoint's queue has made so far."""
        sizes = httpx.get(f"{self.url}/healthz", timeout=10).json()["batch_sizes"][endpoint]
        return sum(sizes.values())


async def load(url: str, endpoint: str, image: bytes, clients: int, seconds: float) -> dict:
    """``clients`` tasks post ``image`` back to back for ``seconds``; latencies of the successful requests."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # TCP_NODELAY: without it a multipart upload (headers and body in separate writes) meets the delayed ACK and
    # every request waits ~40 ms for nothing
    transport = httpx.AsyncHTTPTransport(limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])

    async with httpx.AsyncClient(base_url=url, transport=transport, timeout=120) as client:

        async def one_client() -> None:
            nonlocal failures
            while time.perf_counter() < stop_at:
                start = time.perf_counter()
                response = await client.post(endpoint, files={"image": ("photo.png", image, "image/png")})
                if response.status_code == 200:
                    latencies.append(time.perf_counter() - start)
                else:
                    failures += 1

        began = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        elapsed = time.perf_counter() - began
    latencies.sort()
    return {
        "images_per_s": len(latencies) / elapsed,
        "p50_ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99_ms": 1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))] if latencies else float("nan"),
        "requests": len(latencies),
        "failures": failures,
    }


def run_mode(args, max_batch: int) -> list[dict]:
    endpoint = f"/v1/{args.endpoint}"
    rows = []
    with Server(args.model, max_batch, args.max_wait_ms, args.threads) as server:
        info = httpx.get(f"{server.url}/v1/models", timeout=10).json()["models"][0]
        image = photo_png(args.image, tuple(info["image_size"]))
        print(f"{info['name']}, POST {endpoint}, {len(image)} B PNG per request, max_batch {max_batch}", flush=True)
        asyncio.run(load(server.url, endpoint, image, 1, min(1.0, args.seconds)))  # warm-up
        for clients in args.clients:
            calls_before = server.model_calls(args.endpoint)
            row = asyncio.run(load(server.url, endpoint, image, clients, args.seconds))
            calls = server.model_calls(args.endpoint) - calls_before
            row.update(clients=clients, max_batch=max_batch, mean_batch=row["requests"] / max(calls, 1))
            rows.append(row)
            print(
                f"  max_batch={max_batch:<3d} clients={clients:<3d} {row['images_per_s']:8.1f} img/s  "
                f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:4.1f}  "
                f"({row['requests']} ok, {row['failures']} failed)",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="dualtoken-tiny", help="model folder, embedded model or architecture")
    parser.add_argument("--endpoint", choices=["encode", "reconstruct"], default="encode")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=8.0, help="duration of each measurement")
    parser.add_argument("--max-batch", type=int, default=16, help="micro-batch size of the 'on' mode")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server")
    parser.add_argument("--image", type=Path, default=None, help="photo to send (default: Kodak kodim23)")
    args = parser.parse_args(argv)
    if any(not 1 <= c <= MAX_CLIENTS for c in args.clients) or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")

    print(
        f"server torch threads {args.threads}, {args.seconds:g} s per point, {os.cpu_count()} CPUs, "
        f"python {sys.version.split()[0]}, torch {torch.__version__}"
    )
    off = run_mode(args, max_batch=1)
    on = run_mode(args, max_batch=args.max_batch)

    print("\n| clients | off img/s | on img/s | on/off | off p50 / p99 ms | on p50 / p99 ms | on mean batch |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for a, b in zip(off, on):
        print(
            f"| {a['clients']} | {a['images_per_s']:.1f} | {b['images_per_s']:.1f} | "
            f"{b['images_per_s'] / a['images_per_s']:.2f}x | {a['p50_ms']:.0f} / {a['p99_ms']:.0f} | "
            f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['mean_batch']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
