"""AutoLoRa's automated learning rate: the APGD step-size rule applied to epochs (methods/autolora.py trains with
it; alone here because it is a pure rule over validation accuracies, tested alone)."""
from __future__ import annotations

from typing import Any

from methods.base import EpochDecision

STALL_RULES = ("paper", "reference")


class AutoLRSchedule:
    """AutoLoRa's automated learning rate (the APGD step-size rule applied to epochs).

    Call :meth:`step` once per epoch with the validation robust accuracy. Checkpoints come every
    ``every`` epochs (after epochs 1+every, 1+2·every, ... as the reference's W = {0, 4, 8, ...} with
    1-based epochs). At a checkpoint, with the window the last ``every`` epoch-to-epoch changes:

    1. if fewer than ``rho·every`` of them were rises: halve η and reload the best checkpoint;
    2. else if η and the best validation robust accuracy are both unchanged since the previous checkpoint:
       halve η and reload the best checkpoint.

    Training stops once η < ``lr_min``. ``stall_rule`` says what "η unchanged" means in condition 2:
    ``paper`` (APGD's rule, the paper's equation): η was not halved at the previous checkpoint;
    ``reference``: the authors' code, where it compares η with the value recorded after the previous
    checkpoint's own halving, so it always holds except at the first checkpoint (where their list is not
    initialised): condition 2 reduces to "the best did not improve" from the second checkpoint on.
    """

    def __init__(self, lr0: float = 0.01, every: int = 4, rho: float = 0.75, lr_min: float = 1e-5,
                 stall_rule: str = "paper"):
        if stall_rule not in STALL_RULES:
            raise ValueError(f"stall_rule={stall_rule!r}; valid: {', '.join(STALL_RULES)}")
        self.lr0, self.every, self.rho, self.lr_min, self.stall_rule = lr0, every, rho, lr_min, stall_rule
        self.lr = lr0
        self.values: list[float] = []  # validation robust accuracy per epoch (epoch i+1 at index i)
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.best_key: list[float] | None = None  # [value, tiebreak] of the selected epoch
        # state recorded at the previous checkpoint (the start counts as checkpoint 0)
        self.prev_lr_in = lr0  # η in force when that checkpoint was decided (before any halving)
        self.prev_lr_out = lr0  # η after its decision
        self.prev_best: float | None = None
        self.n_checkpoints = 0
        self.events: list[dict[str, Any]] = []

    @property
    def epoch(self) -> int:
        return len(self.values)

    def is_checkpoint(self, epoch: int) -> bool:
        return epoch - 1 > 0 and (epoch - 1) % self.every == 0

    def step(self, value: float, tiebreak: float = 0.0) -> EpochDecision:
        """``tiebreak`` (validation clean accuracy) decides between epochs of equal ``value``; a full tie goes
        to the later epoch. The reference keeps the first strict maximum (a named deviation, docs/autolora.md);
        the η rules below see only ``value``, as the reference's."""
        self.values.append(float(value))
        epoch = self.epoch
        key = [float(value), float(tiebreak)]  # a list: the state survives a JSON round trip unchanged
        is_best = self.best_key is None or key >= self.best_key
        if is_best:
            self.best, self.best_epoch, self.best_key = float(value), epoch, key
        reload = False
        if self.is_checkpoint(epoch):
            window = self.values[-(self.every + 1):]
            rises = sum(b > a for a, b in zip(window, window[1:]))
            lr_in = self.lr
            reason = None
            if rises < self.rho * self.every:
                reason = "few_rises"
            else:
                prev_lr = self.prev_lr_in if self.stall_rule == "paper" else self.prev_lr_out
                if self.stall_rule == "reference" and self.n_checkpoints == 0:
                    prev_lr = float("nan")  # the reference's uninitialised eta_list[1]: never equal
                if lr_in == prev_lr and self.best == self.prev_best:
                    reason = "stalled"
            if reason is not None:
                self.lr = lr_in / 2
                reload = True
            self.events.append({"epoch": epoch, "rises": rises, "reason": reason, "lr": self.lr,
                                "best": self.best})
            self.prev_lr_in, self.prev_lr_out, self.prev_best = lr_in, self.lr, self.best
            self.n_checkpoints += 1
        return EpochDecision(is_best=is_best, reload_best=reload, stop=self.lr < self.lr_min)

    def state_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("lr", "values", "best", "best_epoch", "best_key", "prev_lr_in",
                                              "prev_lr_out", "prev_best", "n_checkpoints", "events")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, list(v) if isinstance(v, list) else v)
