"""Load benchmark of ``dualtoken serve``: N concurrent clients on loopback, micro-batching on vs off, one run.

The server is ``dualtoken serve`` in a subprocess, bound to 127.0.0.1 on a free port; the clients are asyncio
tasks (httpx) in this process that each send one request at a time, back to back, for a bounded time. For every concurrency level
and both modes the script prints images/s, p50 / p99 latency and the mean batch size the server formed, then the
throughput ratio batching-on / batching-off. With ``--api-key`` both servers require a key (given to them in
$DUALTOKEN_API_KEY, as a deployment would) and every client request carries it.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_serving.py --random-weights --clients 1 4 16 --seconds 8
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
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

    def __init__(
        self,
        model: str,
        max_batch: int,
        max_wait_ms: float,
        threads: int,
        random_weights: bool = False,
        api_key: str | None = None,
    ) -> None:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.argv = [
            sys.executable, "-m", "dualtoken", "serve", "--model", model, "--port", str(self.port),
            "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms), "--max-queue", str(MAX_CLIENTS),
            "--threads", str(threads), "--log-level", "warning", *(["--random-weights"] if random_weights else []),
        ]  # fmt: skip
        self.api_key = api_key
        # what every request to it carries: the key, where it wants one
        self.headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> Server:
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
        env.pop("DUALTOKEN_API_KEY", None)
        if self.api_key:
            env["DUALTOKEN_API_KEY"] = self.api_key
        self.process = subprocess.Popen(self.argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 120
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"dualtoken serve exited: {self.process.stderr.read().decode()[-2000:]}")
            try:
                httpx.get(f"{self.url}/healthz", timeout=2)  # any answer, a 401 included: it is up
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
        sizes = httpx.get(f"{self.url}/healthz", headers=self.headers, timeout=10).json()["batch_sizes"][endpoint]
        return sum(sizes.values())


async def load(
    url: str, endpoint: str, image: bytes, clients: int, seconds: float, headers: dict[str, str] | None = None
) -> tuple[list[float], float, int]:
    """``clients`` tasks post ``image`` (with ``headers``) back to back for ``seconds`` -> (latencies of the
    successful requests, elapsed seconds, failures)."""
    latencies: list[float] = []
    failures = 0
    stop_at = time.perf_counter() + seconds
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    # TCP_NODELAY: without it a multipart upload (headers and body in separate writes) meets the delayed ACK and
    # every request waits ~40 ms for nothing
    transport = httpx.AsyncHTTPTransport(
        limits=limits, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)]
    )

    async with httpx.AsyncClient(base_url=url, transport=transport, headers=headers, timeout=120) as client:

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
    return latencies, elapsed, failures


class Mode:
    """One server setting and everything measured with it at one concurrency level."""

    def __init__(self, name: str, server: Server) -> None:
        self.name, self.server = name, server
        self.latencies: list[float] = []
        self.elapsed = 0.0
        self.failures = 0
        self.calls = 0

    def measure(self, endpoint: str, image: bytes, clients: int, seconds: float) -> None:
        calls_before = self.server.model_calls(endpoint)
        latencies, elapsed, failures = asyncio.run(
            load(self.server.url, f"/v1/{endpoint}", image, clients, seconds, self.server.headers)
        )
        self.calls += self.server.model_calls(endpoint) - calls_before
        self.latencies += latencies
        self.elapsed += elapsed
        self.failures += failures

    def summary(self) -> dict:
        ordered = sorted(self.latencies)
        count = len(ordered)
        return {
            "images_per_s": count / self.elapsed,
            "p50_ms": 1000 * statistics.median(ordered) if ordered else float("nan"),
            "p99_ms": 1000 * ordered[min(count - 1, int(0.99 * count))] if ordered else float("nan"),
            "mean_batch": count / max(self.calls, 1),
            "requests": count,
            "failures": self.failures,
        }


def benchmark(args, off_server: Server, on_server: Server, image: bytes) -> list[tuple[int, dict, dict]]:
    """For each concurrency level, alternate off / on measurements over several rounds (so that load drifting on
    a shared machine hits both modes alike) and pool them."""
    rows = []
    for clients in args.clients:
        modes = [Mode("off", off_server), Mode("on", on_server)]
        for round_index in range(args.rounds):
            for mode in modes if round_index % 2 == 0 else modes[::-1]:
                mode.measure(args.endpoint, image, clients, args.seconds)
        off, on = (mode.summary() for mode in modes)
        for name, row in (("off", off), ("on", on)):
            print(
                f"  batching {name:<3} clients={clients:<3d} {row['images_per_s']:8.1f} img/s  "
                f"p50 {row['p50_ms']:7.1f} ms  p99 {row['p99_ms']:7.1f} ms  mean batch {row['mean_batch']:4.1f}  "
                f"({row['requests']} ok, {row['failures']} failed)",
                flush=True,
            )
        rows.append((clients, off, on))
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model", default="dualtoken-tiny", help="model folder, embedded model or architecture"
    )
    parser.add_argument("--endpoint", choices=["encode", "reconstruct"], default="encode")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4, 16], help="concurrency levels")
    parser.add_argument("--seconds", type=float, default=4.0, help="duration of each measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating off/on measurements per level")
    parser.add_argument("--max-batch", type=int, default=16, help="micro-batch size of the 'on' mode")
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads of the server")
    parser.add_argument("--image", type=Path, default=None, help="photo to send (default: Kodak kodim23)")
    parser.add_argument(
        "--random-weights", action="store_true", help="serve --model as an architecture with random weights"
    )
    parser.add_argument(
        "--api-key", action="store_true", help="the servers require a random API key; the clients send it"
    )
    args = parser.parse_args(argv)
    if any(not 1 <= c <= MAX_CLIENTS for c in args.clients) or not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS} and --seconds in (0, {MAX_SECONDS}]")
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be in 1..10")

    key = secrets.token_urlsafe(24) if args.api_key else None
    with (
        Server(args.model, 1, args.max_wait_ms, args.threads, args.random_weights, key) as off_server,
        Server(args.model, args.max_batch, args.max_wait_ms, args.threads, args.random_weights, key) as on_server,
    ):
        info = httpx.get(f"{off_server.url}/v1/models", headers=off_server.headers, timeout=10).json()["models"][0]
        image = photo_png(args.image, tuple(info["image_size"]))
        print(
            f"{info['name']}, POST /v1/{args.endpoint}, {len(image)} B PNG per request; batching off = max_batch 1, "
            f"on = max_batch {args.max_batch} (max_wait {args.max_wait_ms:g} ms); {args.rounds} x {args.seconds:g} s "
            f"per point; server torch threads {args.threads}; API key {'required' if key else 'off'}; "
            f"{os.cpu_count()} CPUs; python "
            f"{sys.version.split()[0]}, torch {torch.__version__}",
            flush=True,
        )
        for server in (off_server, on_server):  # warm-up
            asyncio.run(load(server.url, f"/v1/{args.endpoint}", image, 1, 1.0, server.headers))
        rows = benchmark(args, off_server, on_server, image)

    print(
        "\n| clients | off img/s | on img/s | on/off | off p50 / p99 ms | on p50 / p99 ms | on mean batch |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for clients, a, b in rows:
        print(
            f"| {clients} | {a['images_per_s']:.1f} | {b['images_per_s']:.1f} | "
            f"{b['images_per_s'] / a['images_per_s']:.2f}x | {a['p50_ms']:.0f} / {a['p99_ms']:.0f} | "
            f"{b['p50_ms']:.0f} / {b['p99_ms']:.0f} | {b['mean_batch']:.1f} |"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
