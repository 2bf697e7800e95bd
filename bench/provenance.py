"""What a trial ran from -- code, environment, data, weights, command line, machine -- recorded in result.json's
``provenance`` block, and the check ``bench reproduce`` makes of it against the present.

:func:`capture` gathers the block when a trial starts and writes its larger parts beside result.json:
``environment.txt`` (every installed distribution, ``name==version``), ``torch_config.txt``
(``torch.__config__.show()``) and, when the code had uncommitted changes, ``provenance.diff``; result.json
keeps their sha256. Every field is taken on its own and never raises: what cannot be found (no git, a
read-only tree, a remote data set) is recorded as ``"unknown"``.

The code's identity (git commit, uncommitted changes, the lock file) comes from the repository the running
``bench`` package lies in. A Ray trial runs a copy of the packages that Ray shipped (no ``.git``, no lock):
the sweep's driver takes those facts once from its own repository and hands them to every trial in the
environment variable :data:`CODE_ENV` (:func:`driver_env`); a trial that finds it uses it.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.files import atomic_write

UNKNOWN = "unknown"
CODE_ENV = "BENCH_CODE_PROVENANCE"  # JSON of :func:`code_facts`, set by a sweep's driver for its trials
LOCK_FILE = "requirements.lock"
DIFF_FILE = "provenance.diff"
ENVIRONMENT_FILE = "environment.txt"
TORCH_CONFIG_FILE = "torch_config.txt"
GIT_TIMEOUT_S = 5
MAX_ENV_DIFF = 64 * 1024  # a larger diff does not travel to Ray trials in an environment variable
MAX_UNTRACKED = 200  # untracked files named in result.json (all of them count in diff_sha256)
MAX_HASHED_UNTRACKED = 16 << 20

# the fields every provenance block has (tests check them; bench reproduce reads them)
FIELDS = ("commit", "dirty", "diff_sha256", "diff_file", "untracked", "code_root", "code_from", "lock_sha256",
          "environment_sha256", "environment_file", "packages", "data_root", "shards", "weights", "argv", "cwd",
          "host", "platform", "python", "cpu", "gpu", "torch_config_sha256", "torch_config_file", "seeds",
          "capture_s")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _safe(fn, *args, default: Any = UNKNOWN, **kwargs) -> Any:
    """``fn(...)``, or ``default`` whatever goes wrong: provenance never fails a trial."""
    try:
        return fn(*args, **kwargs)
    except Exception:
        return default


# --- code ------------------------------------------------------------------------------------------------
def code_root() -> Path:
    """The folder holding the running ``bench`` package (a repository checkout, or a copy Ray shipped)."""
    return Path(__file__).resolve().parents[1]


def _git(root: Path, *args: str) -> bytes:
    # GIT_OPTIONAL_LOCKS=0: `git status` does not refresh (write) the index, so a read-only tree works
    p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, timeout=GIT_TIMEOUT_S,
                       env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})
    if p.returncode != 0:
        raise RuntimeError(p.stderr.decode(errors="replace").strip())
    return p.stdout


def code_facts(root: Path | None = None) -> dict[str, Any]:
    """Commit, dirty state and changes of the repository at ``root`` (default :func:`code_root`), and its
    lock file's sha256. ``diff`` (text) is the uncommitted changes to tracked files; untracked files are
    named in ``untracked`` and count in ``diff_sha256`` by name and content."""
    root = Path(root) if root is not None else code_root()
    facts: dict[str, Any] = {"code_root": str(root), "commit": UNKNOWN, "dirty": UNKNOWN, "diff_sha256": UNKNOWN,
                             "diff": None, "untracked": [], "code_from": UNKNOWN,
                             "lock_sha256": _safe(sha256_file, root / LOCK_FILE)}
    try:
        facts["commit"] = _git(root, "rev-parse", "HEAD").decode().strip()
        diff = _git(root, "diff", "HEAD", "--binary")
        untracked = [n for n in _git(root, "ls-files", "--others", "--exclude-standard", "-z").decode().split("\0")
                     if n]
    except Exception:  # no git, not a repository, a timeout
        return facts
    h = hashlib.sha256(diff)
    for name in sorted(untracked):
        h.update(f"\0untracked {name} {_untracked_digest(root / name)}".encode())
    facts.update(dirty=bool(diff or untracked), diff_sha256=h.hexdigest() if (diff or untracked) else None,
                 diff=diff.decode(errors="replace") if diff else None, untracked=sorted(untracked)[:MAX_UNTRACKED],
                 code_from="git")
    return facts


def _untracked_digest(path: Path) -> str:
    """An untracked file's sha256; a large one (data left in the tree) by size and mtime, to stay under 1 s."""
    try:
        st = path.stat()
        if st.st_size > MAX_HASHED_UNTRACKED:
            return f"size {st.st_size} mtime {st.st_mtime_ns}"
        return sha256_file(path)
    except OSError:
        return UNKNOWN


def driver_env() -> dict[str, str]:
    """For a sweep's driver: its code facts as the environment variable its Ray trials read (the diff itself
    only when it is small; the trials record its sha256 either way)."""
    facts = code_facts()
    if facts.get("diff") and len(facts["diff"]) > MAX_ENV_DIFF:
        facts["diff"] = None
    facts["code_from"] = f"sweep driver ({socket.gethostname()})" if facts["code_from"] == "git" else UNKNOWN
    facts.update(argv=list(sys.argv), cwd=os.getcwd())  # the command behind the row is the sweep's, not Ray's worker
    return {CODE_ENV: json.dumps(facts)}


def _trial_code_facts() -> dict[str, Any]:
    """This process's code facts: the sweep driver's when it handed them over, else the local repository's."""
    handed = os.environ.get(CODE_ENV)
    if handed:
        try:
            facts = json.loads(handed)
            if isinstance(facts, dict):
                return facts
        except json.JSONDecodeError:
            pass
    return code_facts()


# --- environment -----------------------------------------------------------------------------------------
def environment_lines() -> list[str]:
    """Every installed distribution as ``name==version``, sorted (one line each, as pip freeze)."""
    import importlib.metadata as md

    names = {}
    for dist in md.distributions():
        name = dist.metadata["Name"] if dist.metadata else None
        if name:
            names.setdefault(name.lower(), f"{name}=={dist.version}")
    return [names[k] for k in sorted(names)]


def cpu_facts() -> dict[str, Any]:
    from bench.engine import cpu_has_native_bf16

    model = UNKNOWN
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        model = platform.processor() or UNKNOWN
    return {"model": model, "count": os.cpu_count(), "bf16": _safe(cpu_has_native_bf16, default=False)}


def gpu_facts() -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {"count": 0, "names": [], "driver": None, "cuda": torch.version.cuda}
    if not torch.cuda.is_available():
        return out
    out["count"] = torch.cuda.device_count()
    out["names"] = [torch.cuda.get_device_name(i) for i in range(out["count"])]
    try:
        p = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                           capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
        out["driver"] = p.stdout.split("\n")[0].strip() or UNKNOWN
    except Exception:
        out["driver"] = UNKNOWN
    return out


# --- data and weights ------------------------------------------------------------------------------------
def datasets_read(cfg) -> list[str]:
    """The data sets a trial of ``cfg`` reads: its own and its few-shot targets."""
    return [cfg.dataset, *[t for t in (getattr(cfg, "target_datasets", None) or []) if t != cfg.dataset]]


def _split_digest(split: dict) -> str:
    """sha256 of one split's entry in a manifest (its shards, their sha256 and lengths): the split's data."""
    return sha256_bytes(json.dumps(split, sort_keys=True).encode())


def shard_facts(name: str, data_root) -> dict[str, Any]:
    """Where data set ``name``'s shards are, the sha256 of its manifest (``_info.json``, which holds every
    shard's sha256) and a digest of each split's entry, so a changed manifest says which split changed."""
    from data_shards.manifest import MANIFEST, file_location
    from data_shards.paths import dataset_dir, is_remote

    ds = dataset_dir(name, data_root)
    if is_remote(ds):
        return {"dir": str(ds), "manifest_sha256": UNKNOWN, "splits": {}}
    raw = (Path(ds) / MANIFEST).read_bytes()
    splits = json.loads(raw).get("splits", {})
    return {"dir": str(ds), "manifest_sha256": sha256_bytes(raw),
            "splits": {s: _split_digest(entry) for s, entry in splits.items()},
            "manifest": file_location(ds, MANIFEST)}


def weights_facts(backbone: str, pretrained: bool = False) -> dict[str, Any]:
    """The file the backbone's pre-trained weights come from and its sha256 (None: randomly initialised)."""
    from bench.backbones import SUITE_BACKBONES, check_backbone

    import timm

    arch, weights = check_backbone(backbone)
    if weights is None and arch in SUITE_BACKBONES:
        f = timm.models.get_pretrained_cfg(arch).file
        weights = Path(f) if f else None
    if weights is not None:
        return {"backbone": backbone, "file": str(Path(weights).resolve()), "sha256": _cached_sha(Path(weights))}
    if pretrained:  # timm's published weights from the hub or its cache: the file is timm's business
        return {"backbone": backbone, "file": f"timm hub: {arch}", "sha256": UNKNOWN}
    return {"backbone": backbone, "file": None, "sha256": None}


_SHA_CACHE: dict[tuple, str] = {}


def _cached_sha(path: Path) -> str:
    """sha256 of a weights file, once per process per (path, size, mtime): a sweep worker hashes it once."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _SHA_CACHE:
        _SHA_CACHE[key] = sha256_file(path)
    return _SHA_CACHE[key]


def data_root_of(data_root) -> str:
    from data_shards.paths import default_root, is_remote

    if data_root is None:
        return str(default_root())
    return str(data_root) if is_remote(str(data_root)) else str(Path(data_root).expanduser().resolve())


# --- the block -------------------------------------------------------------------------------------------
def capture(cfg, out_dir: str | Path, data_root=None) -> dict[str, Any]:
    """The provenance block of a trial of ``cfg`` writing into ``out_dir``; its sidecar files are written
    there. Never raises; ``capture_s`` is what it cost."""
    import torch

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    code = _safe(_trial_code_facts, default={})
    diff = code.pop("diff", None)
    prov: dict[str, Any] = {k: code.get(k, UNKNOWN) for k in ("commit", "dirty", "diff_sha256", "untracked",
                                                               "code_root", "code_from", "lock_sha256")}
    prov["diff_file"] = None
    if diff is not None and _safe(atomic_write, out_dir / DIFF_FILE, diff, default=None) is not None:
        prov["diff_file"] = DIFF_FILE
    env = _safe(environment_lines, default=[])
    env_text = "".join(line + "\n" for line in env)
    prov["environment_file"] = ENVIRONMENT_FILE if _safe(atomic_write, out_dir / ENVIRONMENT_FILE, env_text,
                                                         default=None) else None
    prov["environment_sha256"] = sha256_bytes(env_text.encode()) if env else UNKNOWN
    prov["packages"] = len(env)
    prov["data_root"] = _safe(data_root_of, data_root)
    prov["shards"] = {name: _safe(shard_facts, name, data_root, default={"dir": UNKNOWN,
                                                                         "manifest_sha256": UNKNOWN, "splits": {}})
                      for name in datasets_read(cfg)}
    prov["weights"] = _safe(weights_facts, cfg.backbone, bool(getattr(cfg, "pretrained", False)),
                            default={"backbone": cfg.backbone, "file": UNKNOWN, "sha256": UNKNOWN})
    prov.update(argv=code.get("argv") or list(sys.argv), cwd=code.get("cwd") or _safe(os.getcwd),
                host=_safe(socket.gethostname),
                platform=_safe(platform.platform), python=sys.version.split()[0])
    prov["cpu"] = _safe(cpu_facts)
    prov["gpu"] = _safe(gpu_facts)
    torch_config = _safe(torch.__config__.show, default="")
    prov["torch_config_sha256"] = sha256_bytes(torch_config.encode()) if torch_config else UNKNOWN
    prov["torch_config_file"] = TORCH_CONFIG_FILE if torch_config and _safe(
        atomic_write, out_dir / TORCH_CONFIG_FILE, torch_config, default=None) else None
    # everything random in a trial derives from the seed (bench.trial.epoch_seed); PYTHONHASHSEED for the rest
    prov["seeds"] = {"seed": cfg.seed, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED")}
    prov["capture_s"] = round(time.perf_counter() - t0, 4)
    return prov


def short_commit(prov: dict | None) -> str | None:
    """``abc1234`` for a clean tree, ``abc1234+`` with uncommitted changes, ``unknown`` without git."""
    if not isinstance(prov, dict) or "commit" not in prov:
        return None
    commit = prov.get("commit")
    if not isinstance(commit, str) or commit == UNKNOWN:
        return UNKNOWN
    return commit[:7] + ("+" if prov.get("dirty") is True else "")


# --- checking a recorded block against the present -------------------------------------------------------
def _changed_shards(ds_dir: Path, split: str, entry: dict) -> list[str]:
    """The shard files of ``split`` that are missing or whose sha256 is not the manifest's."""
    bad = []
    for name in entry.get("shards", []):
        p = ds_dir / name
        if not p.is_file():
            bad.append(f"{name} (missing)")
        elif sha256_file(p) != (entry.get("sha256") or {}).get(name):
            bad.append(name)
    return bad


def differences(recorded: dict, cfg, data_root) -> list[tuple[str, str]]:
    """How the present differs from the ``recorded`` provenance of a trial of ``cfg``: (input, one line) for
    the code (commit, uncommitted changes), the lock file, each data set's manifest and shard files (per
    split), and the backbone's weights. A field recorded as unknown cannot be checked and counts as a
    difference."""
    out: list[tuple[str, str]] = []
    now = code_facts()
    rec_commit, now_commit = recorded.get("commit", UNKNOWN), now["commit"]
    if rec_commit == UNKNOWN or now_commit == UNKNOWN:
        out.append(("code", f"code: commit {rec_commit} recorded, {now_commit} now ({now['code_root']}): "
                              f"cannot tell whether the code is the same"))
    elif rec_commit != now_commit:
        out.append(("code", f"code: commit {rec_commit[:12]} recorded, {now_commit[:12]} now"))
    elif recorded.get("diff_sha256") != now["diff_sha256"]:
        was = f"changes {str(recorded.get('diff_sha256'))[:12]}" if recorded.get("dirty") is True else "clean"
        is_ = f"changes {str(now['diff_sha256'])[:12]}" if now["dirty"] is True else "clean"
        out.append(("code", f"code: uncommitted changes differ on commit {now_commit[:12]} (recorded {was}, "
                              f"now {is_}; the recorded diff is {recorded.get('diff_file') or 'not saved'})"))
    rec_lock = recorded.get("lock_sha256", UNKNOWN)
    if rec_lock == UNKNOWN or rec_lock != now["lock_sha256"]:
        out.append(("lock", f"lock: {LOCK_FILE} sha256 {str(rec_lock)[:12]} recorded, "
                            f"{str(now['lock_sha256'])[:12]} now"))
    for name, rec in (recorded.get("shards") or {}).items():
        out += [("shards", line) for line in _shard_differences(name, rec, data_root)]
    rec_w = recorded.get("weights") or {}
    now_w = _safe(weights_facts, cfg.backbone, bool(getattr(cfg, "pretrained", False)),
                  default={"sha256": UNKNOWN, "file": UNKNOWN})
    if rec_w.get("sha256") == UNKNOWN or rec_w.get("sha256") != now_w.get("sha256"):
        out.append(("weights", f"weights of {cfg.backbone}: sha256 {str(rec_w.get('sha256'))[:12]} recorded "
                               f"({rec_w.get('file')}), {str(now_w.get('sha256'))[:12]} now ({now_w.get('file')})"))
    return out


def _shard_differences(name: str, rec: dict, data_root) -> list[str]:
    from data_shards.manifest import MANIFEST
    from data_shards.paths import dataset_dir, is_remote

    try:
        ds = dataset_dir(name, data_root)
    except FileNotFoundError:
        return [f"data {name}: no shards under {data_root_of(data_root)} (recorded at {rec.get('dir')})"]
    if is_remote(ds) or rec.get("manifest_sha256") == UNKNOWN:
        return [f"data {name}: shards at {ds} cannot be checked (recorded manifest sha256 "
                f"{rec.get('manifest_sha256')})"]
    raw = (Path(ds) / MANIFEST).read_bytes()
    splits = json.loads(raw).get("splits", {})
    lines = []
    if sha256_bytes(raw) != rec.get("manifest_sha256"):
        changed = [s for s, digest in (rec.get("splits") or {}).items()
                   if s not in splits or _split_digest(splits[s]) != digest]
        lines.append(f"data {name}: manifest {Path(ds) / MANIFEST} changed since the run"
                     + (f" (split {', '.join(changed)})" if changed else " (no split's shards changed)"))
    for split in rec.get("splits") or {}:
        if split in splits:
            bad = _changed_shards(Path(ds), split, splits[split])
            if bad:
                lines.append(f"data {name}, split {split}: shard {', '.join(bad)} in {ds} differs from its manifest "
                             f"sha256")
    return lines
