"""Robust evaluation: clean accuracy, PGD-k accuracy and the official AutoAttack (pyautoattack).

All three run on the same first ``n_eval`` test samples, with the model in eval mode.
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
from methods.attacks import eval_mode, pgd_linf


def _batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, desc: str, progress: bool):
    starts = range(0, len(x), batch_size)
    for i in tqdm(starts, desc=desc, leave=False, disable=not progress or len(starts) < 2):
        yield x[i:i + batch_size], y[i:i + batch_size]


@torch.no_grad()
def clean_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256, device="cpu",
                progress: bool = False) -> torch.Tensor:
    """Per sample: is the clean prediction right (on the CPU, one bool per sample)."""
    if len(x) == 0:
        raise ValueError("no samples to evaluate")
    flags = []
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size, "clean", progress):
            flags.append((model(xb.to(device)).argmax(1) == yb.to(device)).cpu())
    return torch.cat(flags)


def clean_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256,
                   device="cpu", progress: bool = False) -> float:
    return clean_flags(model, x, y, batch_size, device, progress).float().mean().item()


def pgd_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, step_size: float,
                 steps: int, batch_size: int = 256, random_start: bool = False, device="cpu",
                 progress: bool = False) -> float:
    correct = 0
    with eval_mode(model):
        for xb, yb in _batches(x, y, batch_size, f"PGD-{steps}", progress):
            xb, yb = xb.to(device), yb.to(device)
            x_adv = pgd_linf(model, xb, yb, eps=eps, step_size=step_size, steps=steps, random_start=random_start)
            with torch.no_grad():
                correct += (model(x_adv).argmax(1) == yb).sum().item()
    return correct / len(x)


AUTOATTACK_STATE = "autoattack_state.json"  # in a trial's out dir: a killed evaluation resumes from it
log = logging.getLogger(__name__)


def autoattack_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str,
                        batch_size: int = 256, device="cpu", seed: int = 0,
                        state_path: str | Path | None = None) -> float | None:
    """Robust accuracy under the official AutoAttack; ``version`` standard/plus/rand/apgd-ce, or off."""
    if version == "off":
        return None
    flags = autoattack_flags(model, x, y, eps=eps, version=version, batch_size=batch_size, device=device,
                             seed=seed, state_path=state_path)
    return flags.float().mean().item()


def autoattack_flags(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, version: str,
                     batch_size: int = 256, device="cpu", seed: int = 0, state_path: str | Path | None = None,
                     clean: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Per sample: robust under AutoAttack ``version`` (a bool per sample, on the CPU).

    ``clean`` (the per-sample clean flags, when the caller has them) saves AutoAttack's own clean pass.
    With ``state_path`` the evaluation resumes: after every batch the robust flags and the attacks and
    batches done are written there (atomically), and a later call with the same model, data and
    settings skips what is done. A batch is what AutoAttack itself batches (``batch_size`` of the points
    still robust, in order, per attack), and each attack re-seeds per batch, so a resumed evaluation gives
    the flags an uninterrupted one gives.

    Why not pyautoattack's own ``run_standard_evaluation(state_path=...)``: in pyautoattack 0.2.0 (the
    newest) its restore cannot work: the attack set is written as a str and compared with a set (restore
    raises "different set of attacks"), the attacks done come back as a list (``add_run_attack`` fails on
    ``.add``) and the restored branch never binds ``y_adv`` (UnboundLocalError at the return); its writes
    are not atomic either. So each batch of each attack goes through ``run_standard_evaluation`` (the
    authors' attack settings per version, their checks) and the bookkeeping is here.
    """
    from pyautoattack import AutoAttack

    aa_log = logging.getLogger("auto-attack")
    if aa_log.level == logging.NOTSET:  # quiet unless the caller configured AutoAttack's log
        aa_log.setLevel(logging.WARNING)
    if version == "apgd-ce":  # the cheap single-attack version, for smoke runs
        adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", attacks=["apgd-ce"],
                               device=device, seed=seed)
    else:
        adversary = AutoAttack(model, norm="Linf", eps=eps, version=version, device=device, seed=seed)
    attacks = list(adversary.attacks_to_run)
    path = Path(state_path) if state_path is not None else None
    fingerprint = _fingerprint(model, x, y, eps=eps, version=version, batch_size=batch_size, seed=seed)
    state = _load_state(path, fingerprint)
    if state is None:
        if clean is None:
            clean = clean_flags(model, x, y, batch_size, device)
        state = {"fingerprint": fingerprint, "attacks": attacks, "done": [], "robust": clean.tolist(),
                 "attack": None, "pending": []}
        _save_state(state, path)
    else:
        left = f", {state['attack']} has {len(state['pending'])} samples left" if state["attack"] else ""
        print(f"AutoAttack resumes from {path}: {', '.join(state['done']) or 'no attack'} done{left}, "
              f"{sum(state['robust'])} of {len(x)} samples still robust")
    robust = torch.tensor(state["robust"], dtype=torch.bool)
    with eval_mode(model):
        for attack in attacks:
            if attack in state["done"]:
                continue
            if state["attack"] != attack:  # the attack starts: its batches are the points robust now
                state["attack"], state["pending"] = attack, torch.nonzero(robust).flatten().tolist()
            adversary.attacks_to_run = [attack]
            bar = tqdm(total=len(state["pending"]), desc=f"AutoAttack {attack}", unit="sample", leave=False,
                       disable=not progress)
            while state["pending"]:
                idx = torch.tensor(state["pending"][:batch_size])
                _, y_adv = adversary.run_standard_evaluation(x[idx].to(device), y[idx].to(device),
                                                             batch_size=batch_size)
                robust[idx] = y_adv.cpu().eq(y[idx].cpu())
                state["robust"], state["pending"] = robust.tolist(), state["pending"][batch_size:]
                _save_state(state, path)
                bar.update(len(idx))
                log.debug("AutoAttack %s: batch done, %d left to attack, %d robust", attack,
                          len(state["pending"]), int(robust.sum()))
            bar.close()
            state["done"].append(attack)
            state["attack"] = None
            _save_state(state, path)
            log.debug("AutoAttack %s done: robust accuracy %.4f", attack, robust.float().mean().item())
    return robust


def _fingerprint(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **settings) -> str:
    """What a saved AutoAttack state is valid for: the weights, the samples and the attack settings."""
    h = hashlib.blake2b(json.dumps(settings, sort_keys=True).encode(), digest_size=16)
    for t in (*model.state_dict().values(), x, y):
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _load_state(path: Path | None, fingerprint: str) -> dict | None:
    if path is None or not path.exists():
        return None
    state = json.loads(path.read_text())
    if state.get("fingerprint") != fingerprint:
        log.warning("AutoAttack state %s belongs to another model, data or settings: starting over", path)
        return None
    return state


def _save_state(state: dict, path: Path | None) -> None:
    if path is None:
        return
    atomic_write_json(path, state, indent=None)  # a kill mid-write leaves the previous state, never half a file


def robust_metrics(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, device="cpu",
                   progress: bool = True, state_dir: str | Path | None = None) -> dict:
    """The ``metrics`` block of result.json. A metric that was not computed is absent.

    One clean pass serves the clean accuracy and AutoAttack's start; with ``state_dir`` a killed
    AutoAttack evaluation resumes from ``state_dir/autoattack_state.json``."""
    clean = clean_flags(model, x, y, cfg.eval_batch_size, device, progress)
    metrics = {"clean_acc": clean.float().mean().item(), "eps": cfg.eps, "n_eval": len(x)}
    if cfg.eval_pgd_steps > 0:
        metrics["pgd_acc"] = pgd_accuracy(model, x, y, eps=cfg.eps, step_size=cfg.eval_step_size,
                                          steps=cfg.eval_pgd_steps, batch_size=cfg.eval_batch_size,
                                          device=device, progress=progress)
        metrics["pgd_steps"] = cfg.eval_pgd_steps
    if cfg.autoattack_version != "off":
        state_path = Path(state_dir) / AUTOATTACK_STATE if state_dir is not None else None
        robust = autoattack_flags(model, x, y, eps=cfg.eps, version=cfg.autoattack_version,
                                  batch_size=cfg.eval_batch_size, device=device, seed=cfg.seed, clean=clean,
                                  progress=progress, state_path=state_path)
        metrics["autoattack_acc"] = robust.float().mean().item()
        metrics["autoattack_version"] = cfg.autoattack_version
    return metrics
