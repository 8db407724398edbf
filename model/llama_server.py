"""Start llama-cpp-python's OpenAI-compatible server (``python -m llama_cpp.server``) on a GGUF, as
a real remote engine for the ``CHAT_ENGINE=openai`` tests and bench/remote.py. Production runs
its own engine cluster (vLLM, TGI, llama.cpp); this only makes one on this machine.

    python -m model.llama_server --port 8001            # the embedded model until Ctrl+C
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LlamaServer:
    """One server process; ``url`` is its OpenAI base URL (ending in /v1)."""

    def __init__(self, gguf: str | Path, port: int | None = None, threads: int = 1, n_ctx: int = 2048,
                 alias: str = "", log_path: str | Path | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--host", "127.0.0.1",
               "--port", str(self.port), "--n_threads", str(threads), "--n_threads_batch", str(threads),
               "--n_ctx", str(n_ctx),
               # by default a new request interrupts the one streaming: requests queue instead
               "--interrupt_requests", "False"]
        if alias:
            cmd += ["--model_alias", alias]
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_ready(self, timeout_s: float = 120.0) -> "LlamaServer":
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server on port {self.port} exited with {self.proc.returncode}")
            try:
                if httpx.get(f"{self.url}/models", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise TimeoutError(f"llama_cpp.server on port {self.port} did not answer within {timeout_s:.0f} s")

    def kill(self) -> None:
        """SIGKILL, as a crashed machine or an OOM kill ends it: no goodbye to open streams."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.kill()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


@contextlib.contextmanager
def llama_servers(gguf: str | Path, n: int = 2, threads: int = 1, **kw):
    """``n`` servers on the same GGUF, started together, all stopped afterwards."""
    servers = [LlamaServer(gguf, threads=threads, **kw) for _ in range(n)]
    try:
        for server in servers:
            server.wait_ready()
        yield servers
    finally:
        for server in servers:
            server.stop()


def main() -> None:
    from model.weights import embedded_gguf_path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gguf", default=None, help="default: the embedded model")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()
    server = LlamaServer(args.gguf or embedded_gguf_path(), args.port, args.threads).wait_ready()
    print(f"serving on {server.url} (Ctrl+C stops)")
    try:
        server.proc.wait()
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    main()
