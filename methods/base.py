"""What every method shares: the config fields every trial understands and the small protocol that
``bench`` drives.

A method is a recipe over plain PyTorch: it builds its model from a backbone, makes its optimizer, and
says what one training step does. ``bench`` owns everything around it (data, the DeepSpeed engine,
evaluation, checkpoints, tracking), so a method is testable with nothing but torch.

The engine a method receives behaves like a DeepSpeed engine: ``engine(x)`` runs the forward,
``engine.backward(loss)`` the backward, ``engine.step()`` the optimizer step (and zeroes the gradients),
``engine.module`` is the wrapped model. Gradients taken outside ``engine.backward`` (an attack's
``torch.autograd.grad``) must go through ``engine.module``, never ``engine(x)``: DeepSpeed hooks its
forward outputs and refuses other backward calls.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable, NamedTuple

import torch
from torch import nn

AUTOATTACK_VERSIONS = ("standard", "plus", "rand", "apgd-ce", "off")
# bench/reliability.py: every indicator of attack failure; quick: those that cost no extra attack; off: none
RELIABILITY_MODES = ("full", "quick", "off")
# Named (train, eval) image transforms, implemented with torchvision in data_shards/transforms.py:
# auto: the data set's usual one (cifar when all images share one size <= 64 px, else imagenet224);
# cifar: pad-4 crop + flip / identity; imagenet224: Resize(256)+RandomResizedCrop(224)+flip /
# Resize(256)+CenterCrop(224) (AutoLoRa's 224-pixel sets); amt128: RandomResizedCrop(128)+ColorJitter(0.4)+flip /
# Resize(146)+CenterCrop(128) (AMT, PMF); none: the stored image at image_size.
TRANSFORMS = ("auto", "cifar", "imagenet224", "amt128", "none")

# What a config field is to the bench (stored in the dataclass field's metadata under "role"):
# result: may change a number, so it is part of the config hash (the default);
# seed: the seed, left out of the hash that groups a config's seeds;
# speed: changes how fast a run goes, never a number (workers, batch size of evaluation, memory layout, compile);
# pool: shapes only the assembly, merging and test evaluation of a pool (AMT), never one member's training.
ROLES = ("result", "seed", "speed", "pool")
# The largest eps (pixel scale) accepted without allow_large_eps: the papers' budgets go up to 16/255.
MAX_EPS = 16 / 255
KEEP_CHECKPOINTS = ("none", "last", "all")
# In a string override of Method.prerequisite_runs: the folder the run writes to (e.g. where it saves an adapter).
RUN_DIR = "{run_dir}"


def setting(default: Any = dataclasses.MISSING, *, role: str = "result",
            default_factory: Any = dataclasses.MISSING, doc: str = "") -> Any:
    """A config field with its role (one of ROLES) and a short description, for ``@dataclass`` configs."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; valid: {', '.join(ROLES)}")
    return field(default=default, default_factory=default_factory, metadata={"role": role, "doc": doc})


def field_roles(cfg_or_cls: Any) -> dict[str, str]:
    """Each config field's role. A field redeclared without a role (a subclass changing a default) keeps
    the role of the class it overrides, so a new default never moves a field into or out of the hash."""
    cls = cfg_or_cls if isinstance(cfg_or_cls, type) else type(cfg_or_cls)
    roles = {}
    for f in dataclasses.fields(cls):
        declared = (vars(c).get("__dataclass_fields__", {}).get(f.name) for c in cls.__mro__)
        roles[f.name] = next((d.metadata["role"] for d in declared if d is not None and "role" in d.metadata),
                             "result")
    return roles


@dataclass
class BaseConfig:
    """Fields every method understands. Defaults are the papers' settings; budgets shrink a run."""

    # what runs
    method: str = ""
    dataset: str = "digits"
    backbone: str = "cifar_resnet18_aa"
    seed: int = setting(0, role="seed")
    # budget
    epochs: int = 60
    max_train_samples: int | None = None  # None: the whole training split
    n_eval: int | None = None  # first n test samples; None: the whole test split
    n_val: int | None = None  # validation samples used for model selection; None: all
    train_attack_steps: int = 10
    eval_pgd_steps: int = 20
    eval_pgd_restarts: int = 1  # the test PGD's runs per sample: the first from the clean input, then random starts
    val_pgd_steps: int = 10
    autoattack_version: str = "standard"
    # Reliability indicators of the test evaluation (docs/reliability.md); they never change a metric, so
    # they are left out of the config hash like a speed switch. reliability_n: the samples full mode's extra
    # attacks run on; None: as many as cost at most 25% of the row's evaluation.
    reliability: str = setting("full", role="speed", doc="reliability indicators: full, quick or off")
    reliability_n: int | None = setting(None, role="speed", doc="samples of full mode's extra attacks (None: "
                                                                 "a 25% cost budget)")
    # threat model (pixel scale, inputs in [0, 1])
    eps: float = 8 / 255
    train_step_size: float = 2 / 255
    eval_step_size: float | None = None  # the test and validation PGD's step; None: eps/4 (2/255 at 8/255)
    # optimisation
    batch_size: int = 128
    eval_batch_size: int = setting(256, role="speed", doc="batch size of evaluation and validation")
    # The test evaluation as Ray tasks, each a slice of whole evaluation batches (bench/sharded_eval.py): the
    # flags equal one process's, so these change speed only. 1: in the trial's process.
    eval_shards: int = setting(1, role="speed", doc="Ray tasks the test evaluation is sharded into (by samples)")
    eval_shard_gpus: float = setting(0.0, role="speed", doc="GPUs per evaluation shard (fractions allowed)")
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 1e-4
    select_metric: str = "val_pgd_acc"  # validation metric that picks the checkpoint
    # engine
    zero_stage: int = 0
    bf16: bool = False  # DeepSpeed bf16: bf16 weights and compute, fp32 master copy
    bf16_autocast: bool = False  # training steps (attack included) under bf16 autocast; evaluation fp32
    channels_last: bool = setting(False, role="speed", doc="NHWC memory layout for the convolutions")
    compile: bool = setting(False, role="speed", doc="compile the engine's module in place (attacks included)")
    # What a finished trial keeps of DeepSpeed's per-epoch checkpoint (best.pt, the selected weights, always
    # stays): "none" (default, lean folders), "last" (the last epoch's weights and optimizer state), "all".
    keep_checkpoints: str = setting("none", role="speed", doc="none | last | all: epoch checkpoints kept after a trial")
    # data
    image_size: int | None = None  # None: the manifest's size
    augment: bool = True  # training-time augmentation of `transform` (off: its eval transform for training too)
    transform: str = "auto"  # one of TRANSFORMS
    # Model-side resize (nearest, before normalisation) as AutoLoRa's authors' model does for CIFAR (32 -> 224):
    # the attack and eps stay on the stored image; None: the network sees the stored image.
    input_resize: int | None = None
    num_workers: int = setting(0, role="speed", doc="data loader worker processes")
    shuffle_buffer: int = 2000
    pretrained: bool = False  # timm backbones: load hub/cached weights
    # eps (and the step sizes) above MAX_EPS are refused unless this is true: eps=1 is more often 1/255 mistyped
    # than an attack over the whole pixel range. Never changes a number (eps itself is in the hash).
    allow_large_eps: bool = setting(False, role="speed", doc="permit eps or step sizes above 16/255")

    # Does the method train on its attack's examples (then train_attack_steps=0 is refused)? False: clean methods.
    TRAINS_ON_ATTACKS: ClassVar[bool] = True

    def validate(self) -> None:
        """Raise ValueError with one line naming the bad field, before any work (a value that would run
        silently but measure something else than asked is refused too)."""
        self._validate_threat_model()
        if self.lr < 0:
            raise ValueError(f"lr={self.lr} must be >= 0")
        for name, why in (("epochs", "0 would evaluate an untrained head"),
                          ("batch_size", "0 would train at batch 1 and record 0"),
                          ("eval_batch_size", "0 would evaluate at batch 1")):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1 ({why})")
        for name in ("train_attack_steps", "eval_pgd_steps", "val_pgd_steps", "num_workers", "shuffle_buffer"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.train_attack_steps == 0 and self.TRAINS_ON_ATTACKS:
            # PGD with 0 steps returns its input: the method would train on clean images under its name
            raise ValueError(f"train_attack_steps=0: method {self.method or type(self).__name__} trains on its "
                             f"attack's examples (0 steps: clean ones); give train_attack_steps >= 1 "
                             f"(clean baselines: ft, pmf, protonet_lora)")
        if self.eval_pgd_steps == 0 and self.autoattack_version == "off" and not isinstance(self, EpisodicConfig):
            raise ValueError("eval_pgd_steps=0 with autoattack_version=off measures no robust accuracy; give "
                             "eval_pgd_steps >= 1 (eval_pgd_steps=0 skips PGD only where AutoAttack runs)")
        if self.val_pgd_steps == 0 and self.select_metric in PGD_SELECT_METRICS:
            raise ValueError(f"val_pgd_steps=0 measures no {self.select_metric}, the select_metric; give "
                             f"val_pgd_steps >= 1, or select on clean accuracy (select_metric="
                             f"{PGD_SELECT_METRICS[self.select_metric]})")
        for name in ("max_train_samples", "n_eval", "n_val"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be positive or null (all)")
        if self.eval_shards < 1:
            raise ValueError(f"eval_shards={self.eval_shards} must be >= 1 (1: evaluate in the trial's process)")
        if self.eval_shard_gpus < 0:
            raise ValueError(f"eval_shard_gpus={self.eval_shard_gpus} must be >= 0")
        if self.eval_pgd_restarts < 1:
            raise ValueError(f"eval_pgd_restarts={self.eval_pgd_restarts} must be >= 1 (the first run starts at the "
                             f"clean input; eval_pgd_steps=0 skips PGD where AutoAttack runs)")
        if self.autoattack_version not in AUTOATTACK_VERSIONS:
            raise ValueError(f"autoattack_version={self.autoattack_version!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
        if self.reliability not in RELIABILITY_MODES:
            raise ValueError(f"reliability={self.reliability!r}; valid: {', '.join(RELIABILITY_MODES)}")
        if self.reliability_n is not None and self.reliability_n <= 0:
            raise ValueError(f"reliability_n={self.reliability_n} must be positive or null (a 25% cost budget)")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"transform={self.transform!r}; valid: {', '.join(TRANSFORMS)}")
        if self.input_resize is not None and self.input_resize <= 0:
            raise ValueError(f"input_resize={self.input_resize} must be positive or null (off)")
        if self.keep_checkpoints not in KEEP_CHECKPOINTS:
            raise ValueError(f"keep_checkpoints={self.keep_checkpoints!r}; valid: {', '.join(KEEP_CHECKPOINTS)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage={self.zero_stage}; valid: 0, 1, 2, 3")

    def _validate_threat_model(self) -> None:
        """eps and the step sizes are in pixel scale: eps=1 meant as 1/255 would attack with the whole range."""
        for name in ("eps", "train_step_size", "eval_step_size"):
            v = getattr(self, name)
            if v is None:  # eval_step_size: eps/4
                continue
            if v < 0:
                raise ValueError(f"{name}={v:g} must be >= 0 (pixel scale, e.g. {name}=8/255)")
            if v > 1 or (v > MAX_EPS and not self.allow_large_eps):
                given = f"{v:g}" if v >= 1 else f"{v:g} ({v * 255:.3g}/255)"
                hint = f"did you mean {name}={v:g}/255?" if v >= 1 else f"e.g. {name}=8/255;"
                allowed = "pixel scale is [0, 1]" if v > 1 else "set allow_large_eps=true to run it as given"
                raise ValueError(f"{name}={given} is above {MAX_EPS * 255:g}/255 (pixel scale): {hint} {allowed}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EpisodicConfig(BaseConfig):
    """Fields of few-shot (episodic) methods, on top of the shared ones."""

    ways: int = 5
    shots: int = 1
    queries: int = 15
    episodes_per_epoch: int = 500
    episodes: int = 600  # test episodes
    val_episodes: int = 5
    # AutoAttack on each test episode's queries (bench/fewshot.py), one of AUTOATTACK_VERSIONS; off by default:
    # the papers report PGD only, and AutoAttack per episode is expensive
    fewshot_autoattack: str = "off"
    base_classes: list[int] | None = None  # None: the manifest's base split (digits: 0-4)
    novel_classes: list[int] | None = None  # None: the manifest's novel split (digits: 5-9)
    # Test domains, each a data set under the shards root (its test split; its val split for per-domain
    # selection); each gets its own few-shot block in result.json. None: the source's novel classes.
    target_datasets: list[str] | None = None

    def validate(self) -> None:
        if self.eval_pgd_steps < 1:  # PGD-0 without a random start leaves the queries clean: adv_acc = clean_acc
            raise ValueError(f"eval_pgd_steps={self.eval_pgd_steps} must be >= 1: the few-shot robust accuracy "
                             f"is PGD's (fewshot_autoattack adds AutoAttack, it does not replace PGD)")
        super().validate()
        for name in ("shots", "queries", "episodes_per_epoch", "episodes", "val_episodes"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be positive")
        if self.ways < 2:
            raise ValueError(f"ways={self.ways} must be >= 2 (one way is always right)")
        if self.target_datasets is not None and (not self.target_datasets
                                                 or len(set(self.target_datasets)) != len(self.target_datasets)):
            raise ValueError(f"target_datasets={self.target_datasets}: give a non-empty list without repeats, "
                             f"or null (the source's novel classes)")
        if self.fewshot_autoattack not in AUTOATTACK_VERSIONS:
            raise ValueError(f"fewshot_autoattack={self.fewshot_autoattack!r}; valid: {', '.join(AUTOATTACK_VERSIONS)}")
        min_ways = {"standard": 4, "plus": 4, "rand": 3}.get(self.fewshot_autoattack, 2)  # (targeted) DLR loss
        if self.ways < min_ways:
            raise ValueError(f"fewshot_autoattack={self.fewshot_autoattack} needs ways >= {min_ways} (DLR loss); "
                             f"ways={self.ways}")


class Episode(NamedTuple):
    """One few-shot task; labels are 0..ways-1 in both sets."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor


@dataclass
class EpochDecision:
    """What the trial loop does after an epoch's validation."""

    is_best: bool = False  # keep this epoch as the selected checkpoint
    reload_best: bool = False  # load the selected checkpoint back before going on
    stop: bool = False


@dataclass
class TrainContext:
    """What ``bench`` hands a method during training."""

    epoch: int = 0
    step: int = 0  # step within the epoch
    steps_per_epoch: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # a fresh pass over the training data without augmentation, (x, y) on device; used e.g. by AutoLoRa's λ
    train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None
    # a fresh pass over the training data as training sees it (augmented, this process's share), (x, y) on device
    augmented_train_batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]] | None = None


class Method:
    """Base of every method. Subclasses set ``Config`` and override ``train_step``.

    Life of a trial: ``__init__`` (builds ``self.model`` from the backbone) -> ``make_optimizer`` ->
    for each epoch: ``start_epoch``, ``train_step`` per batch or episode, validation by ``bench``,
    ``end_epoch`` -> final evaluation of ``eval_model()`` (or ``episode_classifier`` for episodic methods).
    """

    name: ClassVar[str] = ""
    Config: ClassVar[type[BaseConfig]] = BaseConfig
    episodic: ClassVar[bool] = False

    def __init__(self, cfg: BaseConfig, backbone: nn.Module, num_classes: int):
        self.cfg = cfg
        self.model = backbone
        self.num_classes = num_classes
        self.optimizer: torch.optim.Optimizer | None = None
        self.best_val: float | None = None
        self.best_key: tuple[float, float] | None = None  # selection_key of the selected epoch
        self.history: list[dict[str, Any]] = []

    # --- optimisation -------------------------------------------------------------------------------
    def param_groups(self) -> list[dict[str, Any]]:
        return [{"params": [p for p in self.model.parameters() if p.requires_grad]}]

    def make_optimizer(self) -> torch.optim.Optimizer:
        self.optimizer = torch.optim.SGD(self.param_groups(), lr=self.cfg.lr, momentum=self.cfg.momentum,
                                         weight_decay=self.cfg.weight_decay)
        return self.optimizer

    def set_lr(self, lr: float) -> None:
        # DeepSpeed's ZeRO optimizers share the client optimizer's param_group dicts, so this reaches them.
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    # --- training -----------------------------------------------------------------------------------
    def start_epoch(self, ctx: TrainContext) -> dict[str, float]:
        """Called before each epoch; returns values to log (e.g. λ)."""
        return {"lr": self.current_lr()}

    def train_step(self, engine, batch, ctx: TrainContext) -> dict[str, float]:
        raise NotImplementedError

    def end_epoch(self, epoch: int, val: dict[str, float]) -> EpochDecision:
        """Default selection: keep the epoch with the best ``cfg.select_metric`` on validation data; ties go
        to the better validation clean accuracy, then to the later epoch (see :func:`selection_key`)."""
        key = selection_key(val, self.cfg.select_metric)
        self.history.append({"epoch": epoch, "lr": self.current_lr(), **val})
        is_best = key is not None and (self.best_key is None or key >= self.best_key)
        if is_best:
            self.best_val, self.best_key = key[0], key
        return EpochDecision(is_best=is_best)

    # --- runs needed first -------------------------------------------------------------------------
    @classmethod
    def prerequisite_runs(cls, cfg: BaseConfig) -> list[dict[str, Any]]:
        """The runs a trial of ``cfg`` needs finished before it can start (default: none), each given as
        config overrides applied to ``cfg`` (a run of the same method; e.g. AMT: one per pool member, with
        that member's eps). A string value may hold ``RUN_DIR``, replaced by the run's folder when it runs.

        ``bench`` runs them as ordinary trials without their test evaluation, before the trials that need
        them (a sweep: a first Tune phase; ``bench run``: one after the other), and runs each distinct one
        once: two runs whose configs agree on every field but the speed switches are the same run, shared
        by every trial that needs it. So give a run only what shapes it (AMT resets the merge settings)."""
        return []

    @classmethod
    def assemble(cls, cfg: BaseConfig, finished: list[tuple[dict[str, Any], Path]],
                 out_dir: Path) -> dict[str, Any]:
        """Called once every run of ``prerequisite_runs(cfg)`` finished, before the trial of ``cfg`` starts:
        ``finished`` holds each run's result (its result.json) and folder, in the order of
        ``prerequisite_runs``; ``out_dir`` is the trial's folder, where files the trial reads may go.
        Returns config overrides that turn ``cfg`` into the trial to run (AMT: the pool manifest it wrote,
        ``{"pool_dir": out_dir}``); its ``prerequisite_runs`` must then be empty."""
        return {}

    @property
    def needs_training(self) -> bool:
        """False when the method has nothing of its own to train (e.g. AMT merging a trained pool)."""
        return True

    # --- evaluation ---------------------------------------------------------------------------------
    def eval_model(self) -> nn.Module:
        """The network that is evaluated and attacked (inputs in [0, 1], logits out)."""
        return self.model

    def episode_classifier(self, support_x: torch.Tensor, support_y: torch.Tensor, *,
                           episode: int | tuple[int, ...] | None = None) -> nn.Module:
        """Episodic methods: a module mapping query images to logits over the episode's classes. ``episode``
        is the episode's key (bench passes ``(sampler seed, episode index)``): a method with random test-time
        draws derives them from it, so episodes differ and a rerun of one repeats it; None: no key (e.g.
        draws that advance from call to call, ``methods/episode_rng.py``)."""
        raise NotImplementedError(f"{self.name} is not an episodic method")

    # --- state --------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Method state beyond the model's weights (schedules, trajectories); plain data only."""
        return {"best_val": self.best_val, "best_key": self.best_key, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best_val = state.get("best_val")
        key = state.get("best_key")
        self.best_key = tuple(key) if key is not None else None
        self.history = list(state.get("history", []))

    def summary(self) -> dict[str, Any]:
        """What result.json records about the method's run (trajectories, selected epoch)."""
        return {"history": self.history}


# Validation clean accuracy of either kind of method: breaks ties in the selection metric.
CLEAN_VAL_METRICS = ("val_clean_acc", "val_fewshot_acc")
# Selection metrics measured by validation PGD (val_pgd_steps), each with its clean counterpart.
PGD_SELECT_METRICS = {"val_pgd_acc": "val_clean_acc", "val_fewshot_pgd_acc": "val_fewshot_acc"}


def selection_key(val: dict[str, float], metric: str) -> tuple[float, float] | None:
    """What checkpoint selection maximises: (the selection metric, validation clean accuracy).

    Compared with ``>=`` against the best so far, so a tie in both goes to the later epoch. Why: with a small
    validation set or a strong attack the robust accuracy is often tied (0 at every epoch early in training);
    the strict maximum then kept the untrained epoch 0 although clean accuracy kept rising. None when the
    metric was not measured.
    """
    score = val.get(metric)
    if score is None:
        return None
    clean = next((val[k] for k in CLEAN_VAL_METRICS if val.get(k) is not None), 0.0)
    return float(score), float(clean)


def freeze(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)
