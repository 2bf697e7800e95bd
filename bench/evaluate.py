"""Robust evaluation: clean accuracy, PGD-k accuracy and the official AutoAttack (pyautoattack).

All three run on the same first ``n_eval`` test samples, with the model in eval mode and in fp32 whatever
the training dtype (:class:`fp32_eval`). Every attack yields one flag per sample, and a sample is robust
only if it is classified correctly clean and under the attack (``robust <= clean`` by construction); a
row's headline ``robust_acc`` is the per-sample conjunction over every attack that ran.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from bench.files import atomic_write_json
from methods.attacks import eval_mode, pgd_linf_robust

log = logging.getLogger(__name__)


class fp32_eval:
    """Evaluate ``module`` in fp32: floating parameters and buffers held in another dtype (DeepSpeed bf16
    weights) are swapped for fp32 copies for the duration, then the very tensors they were are put back, so
    DeepSpeed's views into its flat buffers stay intact and training goes on untouched.

    Why: bf16's 8-bit mantissa quantises a perturbation of 1/255 on a pixel near 1 and APGD's step-size
    control; an attack in bf16 measures the number format, not the model. A ZeRO-3 module (partitioned
    parameters, ``ds_id``) is gathered by DeepSpeed's hooks in its own dtype and left as it is: its
    validation runs in the training dtype, while the trial's test evaluation runs a plain fp32 copy."""

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.params, self.buffers = [], []
        if any(hasattr(p, "ds_id") for p in self.module.parameters()):
            return self.module  # ZeRO-3: gathered on the fly in the training dtype (the test runs a plain copy)
        for m in self.module.modules():
            for p in m._parameters.values():
                if p is not None and p.is_floating_point() and p.dtype != torch.float32:
                    self.params.append((p, p.data))
                    p.data = p.data.float()
            for name, b in m._buffers.items():
                if b is not None and b.is_floating_point() and b.dtype != torch.float32:
                    self.buffers.append((m, name, b))
                    m._buffers[name] = b.float()
        return self.module

    def __exit__(self, *exc):
        for p, data in self.params:
            p.data = data
        for m, name, b in self.buffers:
            m._buffers[name] = b
        return False


def pgd_step(cfg) -> float:
    """The evaluation PGD's step: ``eval_step_size``, or eps/4 when unset (the papers' 2/255 at 8/255)."""
    return cfg.eval_step_size if cfg.eval_step_size is not None else cfg.eps / 4


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str, progress: bool):
    starts = range(0, len(x), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=not progress or len(starts) < 2):
        yield i, x[i:i + batch_size], y[i:i + batch_size]


@torch.no_grad()
def clean_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, device="cpu",
                progress: bool = False) -> torch.Tensor:
    """Per sample: is the clean prediction right (on the CPU, one bool per sample)."""
    if len(x) == 0:
        raise ValueError("no samples to evaluate")
    flags = []
    with eval_mode(model), fp32_eval(model):
        for _, xb, yb in _batches(x, y, batch_size, "clean", progress):
            flags.append((model(xb.to(device)).argmax(1) == yb.to(device)).cpu())
    return torch.cat(flags)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   device="cpu", progress: bool = False) -> float:
    return clean_flags(model, x, y, batch_size, device, progress).float().mean().item()


def restart_seed(seed: int, first_index: int, restart: int) -> int:
    """The seed of one PGD restart's random start on the batch that begins at sample ``first_index``: a
    function of (seed, sample index, restart) alone, so any batching of the same samples into processes
    or shards draws the same starts for the same batch."""
    return (seed * 1_000_003 + first_index) * 101 + restart


def pgd_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float, steps: int,
              restarts: int = 1, batch_size: int = 256, device="cpu", seed: int = 0, progress: bool = False,
              clean: torch.Tensor | None = None, first_index: int = 0,
              loss_trace: list | None = None) -> torch.Tensor:
    """Per sample: right clean and at every point PGD-``steps`` visited, in every restart (the first from the
    clean input, the others from random starts in the eps-ball). ``clean``: the clean flags, if known.
    ``first_index``: the evaluation's index of ``x[0]`` when ``x`` is a shard of it (the random starts are
    those of the samples' global batches). ``loss_trace``, a list, receives the first run's per-sample loss
    per step: one ``[batch, steps + 1]`` tensor per batch (``torch.cat`` gives ``[N, steps + 1]``)."""
    if clean is None:
        clean = clean_flags(model, x, y, batch_size, device)
    robust = clean.clone()
    with eval_mode(model), fp32_eval(model):
        for i, xb, yb in _batches(x, y, batch_size, f"PGD-{steps}" + (f" x{restarts}" if restarts > 1 else ""),
                                  progress):
            xb, yb = xb.to(device), yb.to(device)
            for r in range(restarts):
                gen = torch.Generator().manual_seed(restart_seed(seed, first_index + i, r))
                trace = [] if loss_trace is not None and r == 0 else None
                _, ok = pgd_linf_robust(model, xb, yb, eps=eps, step_size=step_size, steps=steps,
                                        random_start=r > 0, generator=gen, loss_trace=trace)
                robust[i:i + len(xb)] &= ok.cpu()
                if trace is not None:
                    loss_trace.append(torch.stack(trace, 1))
    return robust


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                 steps: int, batch_size: int = 256, restarts: int = 1, device="cpu", seed: int = 0,
                 progress: bool = False) -> float:
    return pgd_flags(model, x, y, eps=eps, step_size=step_size, steps=steps, restarts=restarts,
                     batch_size=batch_size, device=device, seed=seed, progress=progress).float().mean().item()


AUTOATTACK_STATE = "autoattack_state.json"  # in a trial's out dir: a killed evaluation resumes from it


def make_autoattack(model: nn.Module, *, eps: float, version: str, device, seed: int, n_classes: int | None = None):
    """The official AutoAttack for ``version``: standard, plus, rand, or apgd-ce (standard AutoAttack's first
    stage alone: APGD-CE, 100 iterations, 1 restart; pyautoattack's ``custom`` version would run it with 5).
    With ``n_classes`` below 10, the targeted attacks target the ``n_classes - 1`` other classes."""
    from pyautoattack import AutoAttack

    aa_log = logging.getLogger("auto-attack")
    if aa_log.level == logging.NOTSET:  # quiet unless the caller configured AutoAttack's log
        aa_log.setLevel(logging.WARNING)
    if version == "apgd-ce":
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"], device=device,
                               seed=seed)
        adversary.apgd.n_restarts = 1  # as in standard AutoAttack
    else:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, device=device, seed=seed)
    if n_classes is not None:
        adversary.apgd_targeted.n_target_classes = min(adversary.apgd_targeted.n_target_classes, n_classes - 1)
        adversary.fab.n_target_classes = min(adversary.fab.n_target_classes, n_classes - 1)
    return adversary


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str,
                        batch_size: int = 256, device="cpu", seed: int = 0,
                        state_path: str | Path | None = None) -> float | None:
    """Robust accuracy under the official AutoAttack; ``version`` standard/plus/rand/apgd-ce, or off."""
    if version == "off":
        return None
    flags = autoattack_flags(model, x, y, eps=eps, version=version, batch_size=batch_size, device=device,
                             seed=seed, state_path=state_path)
    return flags.float().mean().item()


def autoattack_seed(seed: int, batch_index: int) -> int:
    """AutoAttack's seed on evaluation batch ``batch_index`` (samples ``batch_index * batch_size`` on): a
    function of (seed, global batch index) alone, so a batch draws the same random starts whichever process
    or shard attacks it."""
    return seed * 1_000_003 + batch_index


def autoattack_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str,
                     batch_size: int = 256, device="cpu", seed: int = 0, state_path: str | Path | None = None,
                     clean: torch.Tensor | None = None, progress: bool = False, first_index: int = 0,
                     on_batch=None, report: dict | None = None) -> torch.Tensor:
    """Per sample: robust under AutoAttack ``version`` (a bool per sample, on the CPU; False where the clean
    prediction is wrong).

    Batches are fixed index ranges of the evaluation: batch ``k`` is samples ``[k * batch_size, (k + 1) *
    batch_size)``. Each attack runs on the points of a batch still robust, with AutoAttack seeded by
    :func:`autoattack_seed` (seed, k). A batch's outcome thus depends on its own samples and ``k`` alone,
    so any split of the batches over processes gives the flags one process gives: ``x`` may be a slice of
    the evaluation starting at sample ``first_index`` (a multiple of ``batch_size``), as a shard of
    ``bench.sharded_eval`` is.

    ``clean`` (the per-sample clean flags, when the caller has them) saves AutoAttack's own clean pass.
    With ``state_path`` the evaluation resumes: after every batch the robust flags and the attacks and
    samples done are written there (atomically), and a later call with the same model, data, settings,
    device and package versions skips what is done, giving the flags an uninterrupted call gives.
    ``on_batch(n_samples)``, if given, is called after every batch (progress across shards).
    ``report``, a dict, receives ``accuracy`` (robust accuracy over all samples after each attack, in order,
    from ``clean``: what AutoAttack's Square check compares) and ``warnings`` (the 'auto-attack' logger's
    warnings of this call: its checks' findings, which would otherwise only reach a log).

    Why not pyautoattack's own ``run_standard_evaluation(state_path=...)``: in pyautoattack 0.2.0 (the
    newest) its restore cannot work: the attack set is written as a str and compared with a set (restore
    raises "different set of attacks"), the attacks done come back as a list (``add_run_attack`` fails on
    ``.add``) and the restored branch never binds ``y_adv`` (UnboundLocalError at the return); its writes
    are not atomic either. So each batch of each attack goes through ``run_standard_evaluation`` (the
    authors' attack settings per version, their checks) and the bookkeeping is here.
    """
    if first_index % batch_size:
        raise ValueError(f"first_index={first_index} is not a multiple of batch_size={batch_size}: "
                         f"batches would not be the evaluation's index ranges")
    captured = _WarningCapture()
    logging.getLogger("auto-attack").addHandler(captured)
    try:
        robust = _autoattack_flags(model, x, y, eps=eps, version=version, batch_size=batch_size, device=device,
                                   seed=seed, state_path=state_path, clean=clean, progress=progress,
                                   first_index=first_index, on_batch=on_batch,
                                   accuracy=report.setdefault("accuracy", {}) if report is not None else {})
    finally:
        logging.getLogger("auto-attack").removeHandler(captured)
    if report is not None:
        report["warnings"] = list(dict.fromkeys(captured.messages))  # once each (checks repeat per batch)
    return robust


class _WarningCapture(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _autoattack_flags(model, x, y, *, eps, version, batch_size, device, seed, state_path, clean, progress,
                      first_index, on_batch, accuracy: dict) -> torch.Tensor:
    with eval_mode(model), fp32_eval(model):
        n_classes = None
        with torch.no_grad():
            n_classes = int(model(x[:1].to(device)).shape[1])
        adversary = make_autoattack(model, eps=eps, version=version, device=device, seed=seed, n_classes=n_classes)
        attacks = list(adversary.attacks_to_run)
        path = Path(state_path) if state_path is not None else None
        fingerprint = _fingerprint(model, x, y, eps=eps, version=version, batch_size=batch_size, seed=seed,
                                   device=device, first_index=first_index)
        state = _load_state(path, fingerprint)
        if state is None:
            if clean is None:
                clean = clean_flags(model, x, y, batch_size, device)
            state = {"fingerprint": fingerprint, "attacks": attacks, "done": [], "robust": clean.tolist(),
                     "attack": None, "pending": [], "accuracy": {"clean": clean.float().mean().item()}}
            _save_state(state, path)
        else:
            left = f", {state['attack']} has {len(state['pending'])} samples left" if state["attack"] else ""
            print(f"AutoAttack resumes from {path}: {', '.join(state['done']) or 'no attack'} done{left}, "
                  f"{sum(state['robust'])} of {len(x)} samples still robust")
        robust = torch.tensor(state["robust"], dtype=torch.bool)
        state.setdefault("accuracy", {})  # a state written before it was recorded
        for attack in attacks:
            if attack in state["done"]:
                continue
            if state["attack"] != attack:  # the attack starts: it attacks the points robust now
                state["attack"], state["pending"] = attack, torch.nonzero(robust).flatten().tolist()
            adversary.attacks_to_run = [attack]
            bar = tqdm(total=len(state["pending"]), desc=f"AutoAttack {attack}", unit="sample", leave=False,
                       disable=not progress)
            while state["pending"]:
                local_batch = state["pending"][0] // batch_size  # the batch (index range) of the next point
                n = next((i for i, p in enumerate(state["pending"]) if p // batch_size != local_batch),
                         len(state["pending"]))
                idx = torch.tensor(state["pending"][:n])
                adversary.seed = autoattack_seed(seed, first_index // batch_size + local_batch)
                _, y_adv = adversary.run_standard_evaluation(x[idx].to(device), y[idx].to(device),
                                                             batch_size=batch_size)
                robust[idx] = y_adv.cpu().eq(y[idx].cpu())
                state["robust"], state["pending"] = robust.tolist(), state["pending"][n:]
                _save_state(state, path)
                bar.update(len(idx))
                if on_batch is not None:
                    on_batch(len(idx))
                log.debug("AutoAttack %s: batch done, %d left to attack, %d robust", attack,
                          len(state["pending"]), int(robust.sum()))
            bar.close()
            state["done"].append(attack)
            state["attack"] = None
            state["accuracy"][attack] = robust.float().mean().item()
            _save_state(state, path)
            log.debug("AutoAttack %s done: robust accuracy %.4f", attack, robust.float().mean().item())
        accuracy.update(state["accuracy"])
    return robust


def _package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"torch": torch.__version__}
    try:
        out["pyautoattack"] = md.version("pyautoattack")
    except md.PackageNotFoundError:
        out["pyautoattack"] = "absent"
    return out


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, device="cpu", **settings) -> str:
    """What a saved AutoAttack state is valid for: the weights, the samples, the attack settings, the device
    and the torch and pyautoattack versions (another kernel or attack implementation gives other flags)."""
    settings = {"first_index": 0, **settings, "device": str(torch.device(device)), "packages": _package_versions(),
                "batches": "index ranges"}  # batches as autoattack_flags forms them (an older state: start over)
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
    for t in (*model.state_dict().values(), x, y):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_state(path: Path | None, fingerprint: str) -> dict | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        log.warning("AutoAttack state %s belongs to another model, data, settings or environment: starting over",
                    path)
        return None
    return state


def _save_state(state: dict, path: Path | None) -> None:
    if path is None:
        return
    atomic_write_json(path, state, indent=None)  # a kill mid-write leaves the previous state, never half a file


def attack_name(kind: str, cfg, autoattack: str | None = None) -> str:
    """A headline attack's name as the leaderboard shows it: "AutoAttack standard", "PGD-20"."""
    return f"AutoAttack {autoattack}" if kind == "autoattack" else f"PGD-{cfg.eval_pgd_steps}"


def evaluate_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu", progress: bool = True,
                   state_dir: str | Path | None = None, details: dict | None = None) -> dict[str, torch.Tensor]:
    """Per-sample flags of every evaluation that ``cfg`` asks for, in order: ``clean``, then ``pgd``
    (``eval_pgd_steps`` > 0) and ``autoattack`` (``autoattack_version`` not off); every attack's flags
    imply the clean ones. With ``state_dir`` a killed AutoAttack evaluation resumes from
    ``state_dir/autoattack_state.json``. ``details``, a dict, receives what the reliability indicators read:
    ``pgd_loss`` (``[N, steps + 1]``, the test PGD's per-step loss) and ``autoattack`` (its ``report``)."""
    flags = {"clean": clean_flags(model, x, y, cfg.eval_batch_size, device, progress)}
    trace = [] if details is not None else None
    if cfg.eval_pgd_steps > 0:
        flags["pgd"] = pgd_flags(model, x, y, eps=cfg.eps, step_size=pgd_step(cfg), steps=cfg.eval_pgd_steps,
                                 restarts=cfg.eval_pgd_restarts, batch_size=cfg.eval_batch_size, device=device,
                                 seed=cfg.seed, progress=progress, clean=flags["clean"], loss_trace=trace)
        if trace:
            details["pgd_loss"] = torch.cat(trace)
    if cfg.autoattack_version != "off":
        state_path = Path(state_dir) / AUTOATTACK_STATE if state_dir is not None else None
        flags["autoattack"] = autoattack_flags(model, x, y, eps=cfg.eps, version=cfg.autoattack_version,
                                               batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed,
                                               clean=flags["clean"], progress=progress, state_path=state_path,
                                               report=details.setdefault("autoattack", {}) if details is not None
                                               else None)
    return flags


def metrics_from_flags(flags: dict[str, torch.Tensor], cfg) -> dict:
    """The ``metrics`` block of result.json from per-sample flags. A metric that was not computed is absent.
    ``robust_acc``: right clean and under every attack that ran, per sample; ``robust_attack`` names the
    strongest of them (AutoAttack when it ran)."""
    clean = flags["clean"]
    metrics = {"clean_acc": clean.float().mean().item(), "eps": cfg.eps, "n_eval": len(clean)}
    robust, headline = clean.clone(), None
    if "pgd" in flags:
        metrics.update(pgd_acc=(flags["pgd"] & clean).float().mean().item(), pgd_steps=cfg.eval_pgd_steps,
                       pgd_step_size=pgd_step(cfg), pgd_restarts=cfg.eval_pgd_restarts)
        robust &= flags["pgd"]
        headline = attack_name("pgd", cfg)
    if "autoattack" in flags:
        metrics.update(autoattack_acc=(flags["autoattack"] & clean).float().mean().item(),
                       autoattack_version=cfg.autoattack_version)
        robust &= flags["autoattack"]
        headline = attack_name("autoattack", cfg, cfg.autoattack_version)
    if headline is not None:
        metrics.update(robust_acc=robust.float().mean().item(), robust_attack=headline)
    return metrics


def robust_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu",
                   progress: bool = True, state_dir: str | Path | None = None) -> dict:
    """The ``metrics`` block of result.json (see :func:`evaluate_flags` and :func:`metrics_from_flags`)."""
    return metrics_from_flags(evaluate_flags(model, x, y, cfg, device, progress, state_dir), cfg)
