"""Memory of ``dualtoken serve`` under a soak: rounds of encode and reconstruct requests from concurrent clients on
loopback, the server's resident memory (VmRSS, Linux) and its 5xx count after each round. Flat RSS over the rounds
means nothing accumulates per request; the first round includes the one-off costs (the ONNX graphs of the default
backend, the search's Gram matrix of the semantic vocabulary).

Run: ``OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_serve_memory.py --rounds 4`` (``--api-key``: the server
requires a key, given through ``$DUALTOKEN_API_KEY``, and every request carries it; a refused one counts as an error)
"""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dualtoken-efflite0")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--encode-clients", type=int, default=2)
    parser.add_argument("--requests", type=int, default=50, help="encode requests per client and round")
    parser.add_argument("--reconstructs", type=int, default=12, help="reconstruct requests per round (one client)")
    parser.add_argument("--image", type=Path, default=REPO.parent / "shared" / "data" / "kodak" / "kodim23.png")
    parser.add_argument("--api-key", action="store_true", help="serve with a random API key and send it")
    args = parser.parse_args()
    key = secrets.token_urlsafe(24) if args.api_key else None
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "dualtoken", "serve", "--model", args.model, "--no-mllm", "--port", str(port),
         "--log-level", "warning"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, **({"DUALTOKEN_API_KEY": key} if key else {})})
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            try:
                httpx.get(f"{url}/healthz", timeout=2)
                break
            except httpx.TransportError:
                if server.poll() is not None:
                    raise SystemExit("the server did not start") from None
                time.sleep(0.5)
        photo = args.image.read_bytes()
        failures = [0]

        def client(count: int, endpoint: str) -> None:
            with httpx.Client(timeout=300, headers=headers) as session:
                for _ in range(count):
                    answer = session.post(url + endpoint, files={"image": (args.image.name, photo, "image/png")})
                    failures[0] += answer.status_code >= 500 or answer.status_code == 401

        if key:  # the key is really required
            refused = httpx.post(url + "/v1/encode", files={"image": (args.image.name, photo, "image/png")})
            print(f"without the key: HTTP {refused.status_code}")
        print(f"| round | requests | seconds | errors (5xx, 401) | RSS (MiB) |\n|---|---|---|---|---|\n"
              f"| start | 0 | - | 0 | {rss_mib(server.pid):.0f} |")
        per_round = args.encode_clients * args.requests + args.reconstructs
        for index in range(args.rounds):
            start = time.perf_counter()
            threads = [threading.Thread(target=client, args=(args.requests, "/v1/encode"))
                       for _ in range(args.encode_clients)]
            threads.append(threading.Thread(target=client, args=(args.reconstructs, "/v1/reconstruct")))
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            print(f"| {index + 1} | {per_round} | {time.perf_counter() - start:.0f} | {failures[0]} | "
                  f"{rss_mib(server.pid):.0f} |", flush=True)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
