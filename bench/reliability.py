"""Reliability indicators: does a row's robust accuracy measure the model, or a failed attack?

Robust accuracy is high either because the model is robust or because the attack failed (masked or zero
gradients, too few steps, a saturated softmax). Each indicator below looks for one way an attack fails, on
the evaluated samples (or the first ``reliability_n`` of them), and has a value, a threshold and a verdict
(``ok`` or ``fired``); a row is ``suspect`` when any indicator fired. docs/reliability.md gives each one's
source, threshold and what to do when it fires.

- AutoAttack's own checks (pyautoattack.checks), called here with a logger that keeps their findings:
  ``aa_randomized``, ``aa_softmax_output``, ``aa_zero_gradients``, ``aa_dynamic``, ``aa_n_classes`` and
  ``aa_square`` (Square lowering the accuracy below the white-box attacks, over the whole run's per-attack
  accuracies; the suite runs AutoAttack one attack at a time, so pyautoattack's own check never sees them).
- ``unavailable_gradients``: samples the attack failed on whose input gradient is exactly zero (Pintor et
  al., "Indicators of Attack Failure", NeurIPS 2022).
- ``incomplete_optimisation``: the test PGD's loss still rising over its last steps (Pintor et al.).
- ``pgd_vs_autoattack``: AutoAttack leaving more samples robust than PGD (it runs the stronger attacks).
- full mode, extra attacks on the subset: ``steps_convergence`` (PGD-2k against PGD-k) and
  ``restarts_convergence`` (random restarts against none) (Carlini et al. 2019, "On Evaluating
  Adversarial Robustness"); ``budget_monotone`` and ``budget_unbounded`` (robust accuracy against eps
  must fall, and reach chance at an unbounded budget: Pintor's "unconstrained attack failure").

Quick mode computes the indicators that cost no extra attack (one input gradient per sample and a few
forwards at most); full mode adds the extra attacks, on the first ``reliability_n`` samples, or, when
``reliability_n`` is unset, on as many as keep their cost within ``COST_SHARE`` of the row's evaluation
(counted in per-sample forward passes of the evaluation, AutoAttack included).
"""
from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bench.evaluate import evaluate_flags, fp32_eval, pgd_flags, pgd_step, restart_seed
from methods.attacks import eval_mode, pgd_linf_robust
from methods.base import RELIABILITY_MODES as MODES  # noqa: F401  (full, quick, off)

BUDGET_MULTIPLES = (0.25, 0.5, 1.0, 2.0, 4.0)  # eps x these for the budget curve
UNBOUNDED_EPS = 1.0  # the whole [0, 1] pixel box: a perturbation of any size
COST_SHARE = 0.25  # the default full mode's extra attacks cost at most this share of the row's evaluation
MIN_AUTO_N = 32  # fewer samples than this in the budget: the extra attacks are skipped (too noisy to judge)
MIN_EXTRA_RESTARTS = 2  # random restarts added by the restarts check (at least; else as many as the row ran)
# Doubling steps or restarts may lower robust accuracy by this much (or one sample, if more) before the row is
# suspect: about the gap between neighbouring leaderboard rows. Carlini et al. give the rule, not a number.
CONVERGENCE_TOLERANCE = 0.02
PINTOR_WINDOW, PINTOR_TOLERANCE = 10, 0.05  # incomplete optimisation: at most 10 last steps, running max change
CHECK_SAMPLES = 64  # samples AutoAttack's model checks look at (they test the model, not the data)


def _indicator(value: Any, threshold: Any, fired: bool, **detail) -> dict:
    return {"value": value, "threshold": threshold, "verdict": "fired" if fired else "ok", **detail}


class _Findings:
    """A stand-in for the logger pyautoattack's checks warn to: keeps what they found."""

    def __init__(self):
        self.messages: list[str] = []

    def warning(self, msg: str) -> None:
        self.messages.append(str(msg))


# ---------------------------------------------------------------------------------------- free indicators
def input_gradients(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, device) -> torch.Tensor:
    """Per sample: the cross-entropy's gradient w.r.t. the input, at the clean input (on the CPU)."""
    out = []
    for i in range(0, len(x), batch_size):
        xb = x[i:i + batch_size].to(device).requires_grad_(True)
        loss = F.cross_entropy(model(xb), y[i:i + batch_size].to(device), reduction="sum")
        (g,) = torch.autograd.grad(loss, xb)
        out.append(g.detach().cpu().contiguous())  # channels_last inputs: AutoAttack's check .view()s it
    return torch.cat(out)


def autoattack_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor, grads: torch.Tensor, *,
                      device, attacks: list[str] | None = None, targets: tuple[int, int] | None = None,
                      attack_accuracy: dict[str, float] | None = None,
                      aa_warnings: list[str] | None = None) -> dict[str, dict]:
    """pyautoattack's checks, each an indicator (value: did the check warn). ``attacks``/``targets`` (the
    AutoAttack version's attacks, and its APGD-T and FAB-T target counts) enable the class-count check,
    ``attack_accuracy`` (robust accuracy after each attack, in order) the Square check; ``aa_warnings``,
    the warnings AutoAttack's own run logged, add its zero-gradient findings inside APGD."""
    from pyautoattack import checks

    out: dict[str, dict] = {}
    xs, ys = x[:CHECK_SAMPLES].to(device), y[:CHECK_SAMPLES].to(device)

    def run(name: str, threshold: str, fn, *args, **kw):
        found = _Findings()
        result = fn(*args, logger=found, **kw)
        out[name] = _indicator(bool(found.messages), threshold, bool(found.messages),
                               **({"message": found.messages[0]} if found.messages else {}))
        return result

    run("aa_randomized", "5 forwards agree (normalised logits within 1e-4, same correct count)",
        checks.check_randomized, model, xs, ys, n=5, alpha=1e-4)
    n_classes = run("aa_softmax_output", "outputs are not a probability distribution (within 1e-5)",
                    checks.check_range_output, model, xs, alpha=1e-5)
    run("aa_zero_gradients", "no sample with an all-zero input gradient", checks.check_zero_gradients, grads)
    if aa_warnings and any("zero gradient" in m for m in aa_warnings) and out["aa_zero_gradients"]["verdict"] == "ok":
        msg = next(m for m in aa_warnings if "zero gradient" in m)
        out["aa_zero_gradients"] = _indicator(True, out["aa_zero_gradients"]["threshold"], True,
                                              message=f"during AutoAttack: {msg}")
    for k in checks.funcs:  # the dynamic check's call counter is global to the module: count this model only
        checks.funcs[k] = 0
    run("aa_dynamic", "no gradient computation inside the forward", checks.check_dynamic, model, xs[:8], False)
    if attacks is not None and targets is not None:
        run("aa_n_classes", "enough classes for the (targeted) DLR attacks and their targets",
            checks.check_n_classes, n_classes, attacks, targets[0], targets[1])
    if attack_accuracy and "square" in attack_accuracy and len(attack_accuracy) > 2:
        white_box = min(v for k, v in attack_accuracy.items() if k != "square")
        run("aa_square", "Square lowers robust accuracy by at most 0.2 points below the white-box attacks",
            checks.check_square_sr, attack_accuracy, alpha=0.002)
        out["aa_square"]["value"] = round(white_box - attack_accuracy["square"], 6)
    return out


def unavailable_gradients(grads: torch.Tensor, survived: torch.Tensor) -> dict:
    """Fraction of the samples the attack failed on whose input gradient is exactly zero: a gradient attack
    cannot move them, so their robustness is the attack's failure (Pintor et al. 2022)."""
    zero = grads.reshape(len(grads), -1).abs().sum(1) == 0
    n = int(survived.sum())
    value = float((zero & survived).sum()) / n if n else 0.0
    return _indicator(value, 0.0, value > 0, samples=n)


def incomplete_optimisation(loss: torch.Tensor, survived: torch.Tensor) -> dict:
    """Pintor et al.'s incomplete-optimisation indicator on the test PGD's per-step loss ``[N, steps + 1]``:
    per sample the loss normalised to [0, 1], its running maximum, and whether that maximum still grew by
    more than ``PINTOR_TOLERANCE`` over its last tenth of the steps (Pintor's last 10 of 100 steps; at least 1,
    at most 10: a window as long as a short run would count every rising loss).
    Value: the fraction of the samples the attack failed on that it fires for; fires for any."""
    steps = loss.shape[1] - 1
    window = min(PINTOR_WINDOW, max(1, round(steps / 10))) if steps > 1 else 0
    n = int(survived.sum())
    if window < 1 or n == 0:
        return _indicator(0.0, 0.0, False, samples=n, window=window)
    lo, hi = loss.min(1, keepdim=True).values, loss.max(1, keepdim=True).values
    span = hi - lo
    norm = torch.where(span > 0, (loss - lo) / span.clamp_min(1e-12), torch.zeros_like(loss))
    running = norm.cummax(1).values
    rising = (running[:, -1] - running[:, -1 - window]) > PINTOR_TOLERANCE
    value = float((rising & survived).sum()) / n
    return _indicator(value, 0.0, value > 0, samples=n, window=window, tolerance=PINTOR_TOLERANCE)


def pgd_vs_autoattack(pgd: torch.Tensor, autoattack: torch.Tensor) -> dict:
    """AutoAttack (APGD and the rest) must not leave more samples robust than PGD-k: more than one sample
    above it means AutoAttack failed where a weaker attack did not."""
    excess = int(autoattack.sum()) - int(pgd.sum())
    return _indicator(excess, 1, excess > 1, unit="samples")


# ---------------------------------------------------------------------------------------- extra attacks
def _random_start_flags(model, x, y, *, eps, step_size, steps, first: int, runs: int, batch_size, device, seed):
    """Per sample: robust under ``runs`` PGD runs from random starts, numbered from ``first`` (the row's own
    runs are 0..first-1, so these are new starts)."""
    robust = torch.ones(len(x), dtype=torch.bool)
    for i in range(0, len(x), batch_size):
        xb, yb = x[i:i + batch_size].to(device), y[i:i + batch_size].to(device)
        for r in range(first, first + runs):
            gen = torch.Generator().manual_seed(restart_seed(seed, i, r))
            _, ok = pgd_linf_robust(model, xb, yb, eps=eps, step_size=step_size, steps=steps, random_start=True,
                                    generator=gen)
            robust[i:i + len(xb)] &= ok.cpu()
    return robust


def extra_attack_plan(cfg) -> list[tuple[str, float, int, int]]:
    """The full mode's extra attacks: (name, eps, steps, runs) each; their per-sample cost is
    ``runs * (steps + 1)`` forwards (and ``runs * steps`` backwards)."""
    k, runs = cfg.eval_pgd_steps or 10, cfg.eval_pgd_restarts
    plan = [("steps_2k", cfg.eps, 2 * k, runs),  # as many runs as the row's, each twice as long
            ("restarts", cfg.eps, k, max(MIN_EXTRA_RESTARTS, runs))]
    # the budget curve: single runs (the row's own PGD is its eps x1 point when it is a single run too)
    plan += [(f"eps_x{m:g}", cfg.eps * m, k, 1) for m in BUDGET_MULTIPLES
             if m != 1.0 or not cfg.eval_pgd_steps or runs > 1]
    plan.append(("unbounded", UNBOUNDED_EPS, k, 1))
    return plan


def extra_forwards_per_sample(cfg) -> int:
    return sum(runs * (steps + 1) for _, _, steps, runs in extra_attack_plan(cfg))


def full_indicators(model: nn.Module, x: torch.Tensor, y: torch.Tensor, clean: torch.Tensor,
                    pgd: torch.Tensor | None, cfg, n_classes: int, device) -> tuple[dict, dict]:
    """The indicators that need extra attacks, on ``x`` (the subset): (indicators, budget curve)."""
    k, step_ratio = cfg.eval_pgd_steps or 10, pgd_step(cfg) / cfg.eps if cfg.eps > 0 else 0.25
    n, bs = len(x), cfg.eval_batch_size

    def attack(eps: float, steps: int, restarts: int = 1) -> torch.Tensor:
        return pgd_flags(model, x, y, eps=eps, step_size=eps * step_ratio, steps=steps, restarts=restarts,
                         batch_size=bs, device=device, seed=cfg.seed, clean=clean)

    single = pgd is not None and cfg.eval_pgd_restarts == 1
    base = pgd if pgd is not None else attack(cfg.eps, k)
    acc = lambda f: (f & clean).float().mean().item()  # noqa: E731
    one = 1 / n  # one sample
    tol = max(one, CONVERGENCE_TOLERANCE)
    out = {}
    twice = attack(cfg.eps, 2 * k, cfg.eval_pgd_restarts if pgd is not None else 1)
    out["steps_convergence"] = _indicator(round(acc(base) - acc(twice), 6), tol, acc(base) - acc(twice) > tol + 1e-9,
                                          steps=[k, 2 * k], robust_acc=[acc(base), acc(twice)])
    runs = max(MIN_EXTRA_RESTARTS, cfg.eval_pgd_restarts)
    restarted = base & _random_start_flags(model, x, y, eps=cfg.eps, step_size=cfg.eps * step_ratio, steps=k,
                                           first=cfg.eval_pgd_restarts, runs=runs, batch_size=bs, device=device,
                                           seed=cfg.seed)
    out["restarts_convergence"] = _indicator(round(acc(base) - acc(restarted), 6), tol,
                                             acc(base) - acc(restarted) > tol + 1e-9,
                                             restarts=[cfg.eval_pgd_restarts, cfg.eval_pgd_restarts + runs],
                                             robust_acc=[acc(base), acc(restarted)])
    eps_list = [cfg.eps * m for m in BUDGET_MULTIPLES]
    curve = [acc(base) if m == 1.0 and (single or pgd is None) else acc(attack(cfg.eps * m, k))
             for m in BUDGET_MULTIPLES]
    rise = max((b - a for a, b in zip(curve, curve[1:])), default=0.0)
    out["budget_monotone"] = _indicator(round(max(rise, 0.0), 6), one, rise > one + 1e-9)
    unbounded = acc(attack(UNBOUNDED_EPS, k))
    chance = 1 / n_classes
    out["budget_unbounded"] = _indicator(unbounded, chance, unbounded > chance, eps=UNBOUNDED_EPS)
    return out, {"eps": eps_list + [UNBOUNDED_EPS], "robust_acc": curve + [unbounded],
                 "clean_acc": clean.float().mean().item(), "chance": chance, "steps": k, "n": n}


# ---------------------------------------------------------------------------------------- one row
def quick_forwards(n: int) -> int:
    """The quick indicators' sample-forwards on ``n`` samples: one input gradient each, and AutoAttack's
    checks (5 forwards for the randomized check and 1 for the output range on up to CHECK_SAMPLES, 8 traced)."""
    return n + 6 * min(n, CHECK_SAMPLES) + 8


def subset_size(cfg, n: int, eval_forwards: int) -> tuple[int, str]:
    """How many samples the full mode's extra attacks run on, and why: ``reliability_n``, or as many as fit,
    with the quick indicators, in COST_SHARE of the evaluation's sample-forwards."""
    if cfg.reliability_n is not None:
        return min(n, cfg.reliability_n), "reliability_n"
    budget = COST_SHARE * eval_forwards - quick_forwards(n)
    fit = max(0, int(budget / max(1, extra_forwards_per_sample(cfg))))
    return min(n, fit), f"{COST_SHARE:.0%} of the evaluation's cost"


def verdict(indicators: dict[str, dict]) -> tuple[str, list[str]]:
    fired = [name for name, ind in indicators.items() if ind["verdict"] == "fired"]
    return ("suspect" if fired else "ok"), fired


def row_reliability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, flags: dict[str, torch.Tensor],
                    details: dict, cfg, *, n_classes: int, eval_forwards: int, device="cpu") -> dict:
    """The ``reliability`` block of a supervised row, from its evaluation's per-sample flags and ``details``
    (bench.evaluate.evaluate_flags)."""
    t0 = time.time()
    mode = cfg.reliability
    clean = flags["clean"]
    survived = clean.clone()  # the samples the row counts robust: every attack that ran failed on them
    for name in ("pgd", "autoattack"):
        if name in flags:
            survived &= flags[name]
    aa = details.get("autoattack", {})
    with eval_mode(model), fp32_eval(model):
        grads = input_gradients(model, x, y, cfg.eval_batch_size, device)
        attacks = targets = None
        if cfg.autoattack_version != "off":
            from bench.evaluate import make_autoattack

            adversary = make_autoattack(model, eps=cfg.eps, version=cfg.autoattack_version, device=device,
                                        seed=cfg.seed, n_classes=n_classes)
            attacks = list(adversary.attacks_to_run)
            targets = (adversary.apgd_targeted.n_target_classes, adversary.fab.n_target_classes)
        indicators = autoattack_checks(model, x, y, grads, device=device, attacks=attacks, targets=targets,
                                       attack_accuracy=aa.get("accuracy"), aa_warnings=aa.get("warnings"))
        indicators["unavailable_gradients"] = unavailable_gradients(grads, survived)
        if "pgd_loss" in details:
            indicators["incomplete_optimisation"] = incomplete_optimisation(details["pgd_loss"],
                                                                            flags["pgd"] & clean)
        if "pgd" in flags and "autoattack" in flags:
            indicators["pgd_vs_autoattack"] = pgd_vs_autoattack(flags["pgd"] & clean, flags["autoattack"] & clean)
        block: dict[str, Any] = {"mode": mode, "n": len(x)}
        if aa.get("warnings"):  # AutoAttack's own log lines, kept with the row instead of lost in a log
            block["autoattack_warnings"] = aa["warnings"]
        skipped: dict[str, str] = {}
        if mode == "full":
            n_sub, why = subset_size(cfg, len(x), eval_forwards)
            if cfg.reliability_n is None and n_sub < MIN_AUTO_N:
                skipped["extra_attacks"] = (f"{n_sub} samples fit in {why} (fewer than {MIN_AUTO_N}): set "
                                            f"reliability_n to run them")
            else:
                sub = slice(0, n_sub)
                extra, curve = full_indicators(model, x[sub], y[sub], clean[sub],
                                               flags["pgd"][sub] if "pgd" in flags else None, cfg, n_classes, device)
                indicators.update(extra)
                block.update(subset_n=n_sub, subset_rule=why, curve=curve)
    row_verdict, fired = verdict(indicators)
    block.update(verdict=row_verdict, fired=fired, indicators=indicators, seconds=round(time.time() - t0, 3),
                 eval_forwards=eval_forwards)
    if skipped:
        block["skipped"] = skipped
    return block


class ForwardCounter:
    """Counts the samples that go through ``module``'s forward (the evaluation's cost, in sample-forwards)."""

    def __init__(self, module: nn.Module):
        self.module, self.count = module, 0

    def __enter__(self):
        self.handle = self.module.register_forward_hook(self._hook)
        return self

    def _hook(self, module, args, output):
        if args and torch.is_tensor(args[0]):
            self.count += len(args[0])

    def __exit__(self, *exc):
        self.handle.remove()
        return False


def evaluate_with_reliability(model: nn.Module, x: torch.Tensor, y: torch.Tensor, cfg, *, n_classes: int,
                              device="cpu", progress: bool = True, state_dir=None) -> tuple[dict, dict | None]:
    """A supervised row's evaluation: (per-sample flags, reliability block, None when ``reliability`` is
    off). The evaluation is bench.evaluate's, unchanged; this adds what the indicators read and their
    extra attacks."""
    if cfg.reliability == "off":
        return evaluate_flags(model, x, y, cfg, device, progress, state_dir), None
    details: dict = {}
    with ForwardCounter(model) as counter:
        flags = evaluate_flags(model, x, y, cfg, device, progress, state_dir, details=details)
    return flags, row_reliability(model, x, y, flags, details, cfg, n_classes=n_classes,
                                  eval_forwards=counter.count, device=device)


# ---------------------------------------------------------------------------------------- few-shot
class FewshotReliability:
    """The indicators that apply to the few-shot query attack, gathered over episodes: AutoAttack's model
    checks on the first episode's classifier, unavailable gradients and incomplete optimisation over every
    episode's queries, PGD against AutoAttack summed over episodes. (The extra attacks of full mode are not
    run per episode.)"""

    def __init__(self, cfg):
        self.cfg = cfg
        self.checks: dict[str, dict] | None = None
        self.grads_zero, self.survived, self.losses, self.rising_survived = [], [], [], []
        self.pgd_robust = self.aa_robust = 0
        self.aa_episodes = 0

    def episode(self, clf: nn.Module, qx: torch.Tensor, qy: torch.Tensor, clean: torch.Tensor,
                pgd: torch.Tensor | None, loss_trace: list | None, autoattack: torch.Tensor | None) -> None:
        device = qx.device
        grads = input_gradients(clf, qx, qy, len(qx), device)
        if self.checks is None:
            self.checks = autoattack_checks(clf, qx.cpu(), qy.cpu(), grads, device=device)
        survived = (autoattack if autoattack is not None else pgd if pgd is not None else clean).cpu() & clean.cpu()
        self.grads_zero.append(grads.reshape(len(grads), -1).abs().sum(1) == 0)
        self.survived.append(survived)
        if pgd is not None and loss_trace:
            self.losses.append((torch.stack(loss_trace, 1), (pgd & clean).cpu()))
        if pgd is not None and autoattack is not None:
            self.pgd_robust += int((pgd & clean).sum())
            self.aa_robust += int((autoattack & clean).sum())
            self.aa_episodes += 1

    def block(self) -> dict:
        indicators = dict(self.checks or {})
        zero, survived = torch.cat(self.grads_zero), torch.cat(self.survived)
        indicators["unavailable_gradients"] = unavailable_gradients(
            torch.where(zero, 0.0, 1.0)[:, None], survived)
        if self.losses:
            steps = {t.shape[1] for t, _ in self.losses}
            if len(steps) == 1:
                indicators["incomplete_optimisation"] = incomplete_optimisation(
                    torch.cat([t for t, _ in self.losses]), torch.cat([s for _, s in self.losses]))
        if self.aa_episodes:
            indicators["pgd_vs_autoattack"] = _indicator(self.aa_robust - self.pgd_robust, 1,
                                                         self.aa_robust - self.pgd_robust > 1, unit="samples")
        row_verdict, fired = verdict(indicators)
        return {"mode": "quick" if self.cfg.reliability == "full" else self.cfg.reliability, "n": len(survived),
                "verdict": row_verdict, "fired": fired, "indicators": indicators}

