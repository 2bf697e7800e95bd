"""Shared fixtures: offline W&B, a per-session torch-extensions cache, the embedded digits shards, a cluster of
``ray start`` nodes without a shared disk (``ray_start_cluster``)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
# DeepSpeed compiles a small CPU op once (~40 s); keep it in the repo's ignored cache, reused across runs.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(ROOT / ".cache" / "torch_extensions"))


@pytest.fixture(scope="session")
def shards_root(tmp_path_factory) -> Path:
    """A shards root holding the embedded default data set, built once per session."""
    from data_shards.digits import make_digits

    root = tmp_path_factory.mktemp("shards")
    make_digits(root)
    return root


@pytest.fixture(scope="session")
def digits_dir(shards_root) -> Path:
    return shards_root / "digits"


def _restamp(ds_dir: Path, name: str) -> None:
    from data_shards.manifest import read_manifest, write_manifest
    from data_shards.writer import sha256_file

    info = read_manifest(ds_dir)
    for split in info["splits"].values():
        if name in split["shards"]:
            split["sha256"][name] = sha256_file(Path(ds_dir) / name)
    write_manifest(ds_dir, info)


@pytest.fixture
def restamp():
    """``restamp(ds_dir, shard_name)``: give the manifest a damaged shard's sha256, so that reading gets past
    the verification against the manifest (as a remote shard does, data_shards/verify.py) to the readers'
    own checks of truncation and decoding."""
    return _restamp


def bench_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "bench", *args]


@pytest.fixture(autouse=True)
def _wandb_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))


class RayStartCluster:
    """A cluster of ``ray start`` nodes on this machine, as a user starts one on several: every node has its
    own temp dir (so its own session folder, logs and trial folders) and its own ports; token
    authentication as Ray 2.60 enables it, with a token of the test's own (RAY_AUTH_TOKEN_PATH), never
    ~/.ray/auth_token. Nodes are stopped by killing the processes that name their temp dir (never
    ``ray stop``, which would stop every Ray on the machine)."""

    def __init__(self):
        import secrets
        import tempfile

        # short: a node's socket paths (TEMP/session_<date>_<pid>/sockets/...) must fit in 107 bytes
        self.root = root = Path(tempfile.mkdtemp(prefix="rs", dir="/tmp"))
        token = root / "auth_token"
        token.write_text(secrets.token_hex(32))
        # what every node and the driver needs: token mode, and where the token is
        self.env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token),
                        RAY_USAGE_STATS_ENABLED="0")
        self.env.pop("RAY_ADDRESS", None)
        self.env.pop("PYTHONPATH", None)  # the code reaches the workers through the runtime_env, not this
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.nodes: list[Path] = []

    def _ports(self) -> list[str]:
        names = ("--node-manager-port", "--object-manager-port", "--metrics-export-port", "--runtime-env-agent-port",
                 "--dashboard-agent-grpc-port", "--dashboard-agent-listen-port")
        out = [a for name in names for a in (name, str(_free_port()))]
        low = 20000 + (os.getpid() * 37 + len(self.nodes) * 211) % 30000
        return out + ["--min-worker-port", str(low), "--max-worker-port", str(low + 200)]

    def start(self, name: str, num_cpus: int, head: bool = False) -> Path:
        temp = self.root / name
        ray = [sys.executable, "-m", "ray.scripts.scripts", "start", "--temp-dir", str(temp), "--num-cpus",
               str(num_cpus), "--disable-usage-stats", *self._ports()]
        if head:
            ray += ["--head", "--port", str(self.port), "--include-dashboard", "false",
                    "--dashboard-port", str(_free_port())]
        else:
            ray += ["--address", self.address]
        self.nodes.append(temp)
        out = subprocess.run(ray, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        return temp

    def sweep(self, cmd: list[str], cwd: Path) -> subprocess.Popen:
        """``cmd`` (a ``bench sweep`` on this cluster) started as its driver; its output goes to a file (a pipe
        nobody reads while the sweep runs would fill and stop it): read it with :meth:`output`."""
        log = self.root / f"driver{len(list(self.root.glob('driver*.log')))}.log"
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, cwd=cwd, env=self.env, stdout=f, stderr=subprocess.STDOUT, text=True)
        proc.log = log
        return proc

    @staticmethod
    def output(proc: subprocess.Popen) -> str:
        return proc.log.read_text(errors="replace")

    def wait_for(self, proc: subprocess.Popen, condition, what: str, timeout_s: float = 300,
                 poll_s: float = 0.5) -> None:
        """Until ``condition()`` holds while the driver ``proc`` runs; else the test fails with its output."""
        deadline = time.time() + timeout_s
        while time.time() < deadline and proc.poll() is None:
            if condition():
                return
            time.sleep(poll_s)
        proc.kill()
        pytest.fail(f"no {what} (driver exit {proc.wait()}): " + self.output(proc)[-3000:])

    def kill(self, temp: Path, sig=signal.SIGKILL) -> int:
        import psutil

        n = 0
        for proc in psutil.process_iter(["pid", "cmdline"]):
            try:
                if any(str(temp) in part for part in proc.info["cmdline"] or []):
                    proc.send_signal(sig)
                    n += 1
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return n

    def shutdown(self) -> None:
        import shutil

        for temp in reversed(self.nodes):
            self.kill(temp)
        time.sleep(1)
        shutil.rmtree(self.root, ignore_errors=True)


def _free_port() -> int:
    from bench.engine import free_port

    return free_port()


@pytest.fixture
def ray_start_cluster():
    """A :class:`RayStartCluster` with no node yet; every node it started is stopped at the end."""
    cluster = RayStartCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()
