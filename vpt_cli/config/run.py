"""Run settings as dataclasses, loadable from YAML and overridable from the command line.

A run is described by four sections (backbone, prompt, data, train). The resolved config (YAML
file, then CLI flags on top, then defaults filled in) is saved next to every run and inside the
task file, so a result can always be traced back to exactly what produced it. No torch here:
`vpt --help` imports this module and must stay fast.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from vpt_cli.config.fields import setting
from vpt_cli.core.errors import UsageError
from vpt_cli.methods import MethodInfo, get_method, method_names

DEFAULT_BACKBONE = "vit_base_patch16_224.augreg_in21k"
METHODS = method_names()  # vpt_cli.methods: one registered MethodInfo each
OPTIMIZERS = ("adamw", "sgd")
AUGMENTS = ("none", "flip", "crop")
AUTO_PROMPT_FRACTION = 0.05  # of the patch tokens: the paper's 10 prompts at 224 px / 196 patches
HEAD_INITS = ("probe", "zeros")
PROMPT_INITS = ("tokens", "uniform")
# The reference's readings of the last layer (vpt-method.md, "Pooling variants"); None in the
# config means the backbone's own pooling.
POOLS = ("token", "prefix", "avg", "avg-patches", "avg-prompts")
# Checkpoints pretrained without a CLS objective, pooled by averaging in the reference code: a
# backbone whose timm tag is one of these defaults to prompt.pool "avg".
AVG_POOLED_TAGS = ("mae",)
TOKEN_INIT_IMAGES = 32  # training images whose patch tokens seed the prompts (prompt.init "tokens")
DEVICES = ("auto", "cpu", "cuda", "mps")
SELECTS = ("auto", "best", "last")
DATA_FORMATS = ("auto", "folders", "csv", "vtab", "fgvc")  # vpt_cli.data.readers
BALANCES = ("none", "reweight", "resample", "logit-adjust")  # vpt_cli.objectives.balance
# --tau's default. Measured on Fashion-MNIST-LT (README, "Long tail"): 2 beats Menon et al.'s 1 for the
# linear probe at imbalance 10 and 100 and for the refitted head at 100, and ties it for prompt training.
DEFAULT_TAU = 2.0
HEAD_REFITS = ("auto", "always", "never")  # train.refit_head
# --refit-head auto refits when the largest training class has at least this many times the
# images of the smallest (a mild imbalance, 3:1, is already where the trained head's bias shows).
LONG_TAIL_RATIO = 3.0
LOSSES = ("bce", "asl")  # multi-label tasks: vpt_cli.objectives.multi_label
MAX_LABEL_SEP = 8
# Below this, best-on-val is noise: top-1 on a val split of n images has a standard error near
# 0.4/sqrt(n), several times the gap between late epochs, and the probe start it competes with
# had its strength picked on the same split (README, "Defaults").
MIN_VAL_PER_CLASS_TO_SELECT = 20
ADAMW_PROMPT_LR = 1e-2
ADAMW_HEAD_LR = 3e-3
SGD_BASE_LR = 2.5  # the paper's recipe scales it: lr = base * batch / 256
# A full fine-tune's backbone without --lr: pretrained weights need a far smaller step than a new head.
FULL_FINETUNE_LR = 2e-5
ALL_SHOTS = "all"  # data.shots: every training image
TUNED = "tuned"  # train.threshold: each class's own, tuned on val (multi-label tasks)


@dataclass
class BackboneConfig:
    """Which frozen ViT to prompt and where its weights come from."""

    name: str = setting(DEFAULT_BACKBONE, flag="--backbone", help="timm model name with pretrained tag.")
    weights: str | None = setting(None, flag="--backbone-weights", path=True, shown="timm's hub download",
                                  help="Local backbone weights (.safetensors/.npz/.pth) instead of the hub download.")
    img_size: int | None = setting(None, flag="--img-size", shown="the backbone's",
                                   help="Input size in pixels; position embeddings are resampled.")
    kwargs: dict[str, Any] = setting(flag="--backbone-arg", default_factory=dict, shown="none",
                                     help="Extra timm constructor argument KEY=VALUE (repeatable), e.g. depth=2.")


def _method_help() -> str:
    return "; ".join(f"{get_method(name).name}: {get_method(name).summary}" for name in METHODS) + "."


def _dropout_defaults() -> str:
    return ", ".join(f"{get_method(name).default_dropout:g} {name}" for name in METHODS if get_method(name).prompts)


def _fraction_defaults() -> str:
    return ", ".join(f"{get_method(name).default_fraction:g} {name}" for name in METHODS if get_method(name).transform)


@dataclass
class PromptConfig:
    """What is trained: VPT-deep/shallow prompts, or a baseline (linear probe, full fine-tune)."""

    method: str = setting("vpt-deep", flag="--method", choices=METHODS, help=_method_help())
    num_prompts: int | None = setting(  # None = auto_num_prompts(patch tokens), resolved once the backbone is known
        None, flag="--prompts", help="Prompt tokens per layer.",
        shown=f"auto, {AUTO_PROMPT_FRACTION:.0%} of the patch tokens and at least 1: 10 at 224 px with 16 px patches, "
        "1 at 56 px with 14 px")
    dropout: float | None = setting(None, flag="--prompt-dropout", shown=_dropout_defaults(),
                                    help="Dropout on prompt tokens.")
    proj_dim: int = setting(0, help="A Linear(proj_dim -> width) prompt projection when > 0 (YAML only).")
    init: str = setting("tokens", flag="--prompt-init", choices=PROMPT_INITS, help=(
        f"How prompts start: tokens (patch tokens the frozen backbone sees at each layer, from {TOKEN_INIT_IMAGES} "
        "training images) or uniform (the paper's random init)."))
    pool: str | None = setting(
        None, flag="--pool", choices=POOLS, shown=f"the backbone's own; avg for .{', .'.join(AVG_POOLED_TAGS)} tags",
        help="How the last layer becomes features: token (the CLS output), prefix (the mean of the prefix outputs, as "
        "distilled DeiT pools), avg (the mean of every token after the "
        "prefix, prompts included, then fc_norm; MAE and MoCo v3 in the paper), avg-patches or avg-prompts (the mean "
        "of those only).")
    fourier_fraction: float | None = setting(
        None, flag="--fourier-fraction", shown=_fraction_defaults(), help=(
            "vfpt: the share of each layer's prompts, floor(share x prompts), replaced by the real part of their 2-D "
            "FFT (0 is vpt-deep exactly; docs/vfpt.md)."))

    @property
    def info(self) -> MethodInfo:
        """The method's registered record (vpt_cli.methods)."""
        return get_method(self.method)

    @property
    def deep(self) -> bool:
        return self.info.deep

    @property
    def length(self) -> int:
        """Prompt tokens actually inserted (baselines insert none)."""
        if not self.info.prompts:
            return 0
        if self.num_prompts is None:
            raise UsageError("prompt.num_prompts is 'auto' until resolve_prompts() has seen the backbone")
        return self.num_prompts

    def resolve(self, backbone: BackboneFacts) -> PromptConfig:
        """A copy with the prompt count, dropout, Fourier fraction and pooling made concrete for
        `backbone`: 'auto' prompts are auto_num_prompts of its patch tokens; no pooling asked for is the one the
        reference uses for the checkpoint (avg for MAE tags), else the backbone's own by name."""
        count = self.num_prompts if self.num_prompts is not None else auto_num_prompts(backbone.num_patches)
        averaged = backbone.name.partition(".")[2] in AVG_POOLED_TAGS
        fraction = self.resolved_fraction if self.info.transform else (self.fourier_fraction or 0.0)
        return replace(self, num_prompts=count if self.info.prompts else (self.num_prompts or 0),
                       dropout=self.resolved_dropout, fourier_fraction=fraction,
                       pool=self.pool or ("avg" if averaged else backbone.own_pool))

    @property
    def resolved_fraction(self) -> float | None:
        """The method's prompt-transform fraction (None: the method transforms nothing)."""
        if self.info.transform is None:
            return None
        return self.fourier_fraction if self.fourier_fraction is not None else self.info.default_fraction

    @property
    def resolved_dropout(self) -> float:
        if self.dropout is not None:
            return self.dropout
        return self.info.default_dropout


@dataclass(frozen=True)
class BackboneFacts:
    """What a run's 'auto' settings are resolved against, known once its backbone is built."""

    name: str  # timm name with tag
    num_patches: int
    img_size: int
    weights: str | None  # the local weights file (absolute), or None for timm's hub download
    own_pool: str | None  # the backbone's own pooling by its POOLS name (None: it has none)


def auto_num_prompts(num_patches: int) -> int:
    """About 5% of the patch tokens, at least 1: 10 at 224 px / 196 patches as in the paper, but 1 at
    56 px / 16 patches, where 10 random prompts would be 37% of the tokens and drag the starting
    features (and the probe-initialised head) below the plain linear probe (README, "Defaults")."""
    return max(1, round(AUTO_PROMPT_FRACTION * num_patches))


@dataclass
class DataConfig:
    """Where the images are and how they are split and augmented."""

    path: str = setting("", help="The data: DATA on the command line.")
    val_split: float = setting(0.1, flag="--val-split", help="Stratified held-out fraction when DATA has no val/ folder.")
    augment: str = setting("flip", flag="--augment", choices=AUGMENTS,
                           help="none, flip, or crop (random resized crop + flip).")
    workers: int | None = setting(None, flag="--workers", shown="auto", help="Image decoding processes.")
    format: str = setting("auto", flag="--data-format", choices=DATA_FORMATS,
                          help="How to read DATA; auto picks by the files there.")
    trainval: bool = setting(False, flag="--trainval/--no-trainval", help=(
        "List formats: train on train+val (VTAB's train800val200) and score on test, the paper's final retrain."))
    shots: int | str = setting(ALL_SHOTS, flag="--shots",
                               help="Keep K training images per class, drawn per class with --seed (multi-label: "
                               "at least K positives per class; README, \"Multi-label\").")
    multi_label: bool = setting(False, flag="--multi-label/--single-label", help=(
        "Read a CSV's 'label' column as several labels per image, split by --label-sep (a 'labels' column always "
        "is); the task then scores each class on its own (README, \"Multi-label\")."))
    label_sep: str = setting(";", flag="--label-sep", help=(
        "What separates the labels in a multi-label cell, e.g. ' ' for fastai-style files."))

    @property
    def shot_count(self) -> int | None:
        """K of --shots, or None for every training image."""
        return None if self.shots in (ALL_SHOTS, None) else self.shots


@dataclass
class TrainConfig:
    """Optimisation. Defaults are tuned for small folders on a CPU; see README "Defaults"."""

    epochs: int = setting(30, flag="--epochs", help="Training epochs.")
    batch_size: int = setting(32, flag="--batch-size", help="Images per step.")
    optimizer: str = setting("adamw", flag="--optimizer", choices=OPTIMIZERS,
                             help="adamw (tuned for small folders) or sgd (the paper's recipe).")
    lr: float | None = setting(None, flag="--lr", shown=f"{ADAMW_PROMPT_LR:g} adamw; {SGD_BASE_LR:g}*batch/256 sgd",
                               help="Prompt learning rate.")
    head_lr: float | None = setting(None, flag="--head-lr", shown=f"{ADAMW_HEAD_LR:g} adamw; = --lr sgd",
                                    help="Head learning rate.")
    weight_decay: float = setting(1e-4, flag="--weight-decay", help="Weight decay (head; all but head bias with sgd).")
    warmup_epochs: int | None = setting(None, shown="a tenth of the epochs",
                                        help="Linear warmup epochs, as in the paper (YAML only).")
    head_init: str = setting("probe", choices=HEAD_INITS,
                             help="probe: fit a linear probe on the initial features first; zeros (YAML only).")
    patience: int = setting(10, flag="--patience", help=(
        "Stop after this many epochs without val improvement (0: never; only when the best epoch is kept)."))
    select: str = setting("auto", flag="--select", choices=SELECTS, help=(
        "Which epoch becomes the task: best (on val, the probe's start included), last, or auto: best when val has "
        f"at least {MIN_VAL_PER_CLASS_TO_SELECT} images per class, else last."))
    balance: str = setting("logit-adjust", flag="--balance", choices=BALANCES, help=(
        "Unequal class counts: reweight (inverse-frequency loss weights), resample (class-balanced batches), "
        "logit-adjust (Menon et al. 2021, see --tau). Multi-label tasks: any but none weighs each class's positives by "
        "its negatives/positives ratio; resample is refused."))
    tau: float = setting(DEFAULT_TAU, flag="--tau", help=(
        "Strength of --balance logit-adjust: logits + tau * log(class prior); 2 measured best for the probe and the "
        "refitted head (README, \"Long tail\")."))
    refit_head: str = setting("auto", flag="--refit-head", choices=HEAD_REFITS, help=(
        "After training, fit the head once more as a linear probe on the final prompted features under --balance "
        "(classifier re-training, Kang et al. 2020). auto: for single-label tasks when --balance is not none and "
        f"the largest training class has {LONG_TAIL_RATIO:g}x the images of the smallest (README, \"Long tail\")."))
    loss: str = setting("bce", flag="--loss", choices=LOSSES, help=(
        "Multi-label tasks: bce (binary cross-entropy on every class) or asl (timm's asymmetric loss, Ridnik et al. "
        "2021, which down-weights the many easy negatives)."))
    threshold: float | str = setting(TUNED, flag="--threshold", shown="tuned per class on val", help=(
        "Multi-label tasks: one score threshold in [0, 1] for every class, instead of each class's own, tuned on "
        "val for its F1 (0.5 for a class without a val positive)."))
    seed: int = setting(0, flag="--seed", help="Seed for init, split and shuffling.")
    device: str = setting("auto", flag="--device", choices=DEVICES, help="auto picks cuda, then mps, then cpu.")
    amp: bool = setting(False, flag="--amp/--no-amp", help="Mixed precision (bf16, or fp16 on GPUs without bf16).")

    @property
    def fixed_threshold(self) -> float | None:
        """--threshold's one value for every class, or None: each class's own, tuned on val."""
        return None if self.threshold == TUNED else float(self.threshold)

    def resolved_lr(self) -> float:
        if self.lr is not None:
            return self.lr
        return ADAMW_PROMPT_LR if self.optimizer == "adamw" else SGD_BASE_LR * self.batch_size / 256

    def resolved_head_lr(self) -> float:
        if self.head_lr is not None:
            return self.head_lr
        return ADAMW_HEAD_LR if self.optimizer == "adamw" else self.resolved_lr()

    def resolve(self, trains_backbone: bool) -> TrainConfig:
        """A copy with the learning rates and the warmup made concrete (a full fine-tune's
        backbone, with no --lr, trains at FULL_FINETUNE_LR)."""
        lr = self.lr if self.lr is not None else FULL_FINETUNE_LR if trains_backbone else self.resolved_lr()
        return replace(self, lr=lr, head_lr=self.resolved_head_lr(), warmup_epochs=self.resolved_warmup())

    def resolved_warmup(self) -> int:
        return self.warmup_epochs if self.warmup_epochs is not None else self.epochs // 10


@dataclass
class SweepConfig:
    """The search grid of `vpt sweep` and how trials are cut (successive halving, budget)."""

    lrs: tuple[float, ...] = (1e-3, 3e-3, 1e-2)
    weight_decays: tuple[float, ...] = (0.0, 1e-4, 1e-2)
    eta: int = 3  # after each rung only the best 1/eta of the trials go on
    budget: str | None = None  # "12" trials or "15m" of wall time; None = the whole grid


@dataclass
class RunConfig:
    """Everything that defines one training run."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    prompt: PromptConfig = field(default_factory=PromptConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolve(self, backbone: BackboneFacts, workers: int) -> RunConfig:
        """What runs, as a new config: every 'auto' value concrete for `backbone` and `workers`
        decoding processes, and absolute paths. It is the run's args.yaml (reusable with --config
        from any folder: resolving it again changes nothing) and the task file's record."""
        return replace(
            self, backbone=replace(self.backbone, weights=backbone.weights, img_size=backbone.img_size,
                                   kwargs=dict(self.backbone.kwargs)),
            prompt=self.prompt.resolve(backbone),
            data=replace(self.data, path=str(Path(self.data.path).resolve()), workers=workers),
            train=self.train.resolve(self.prompt.info.trains_backbone))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        config = cls()
        apply_overrides(config, _flatten(raw))
        return config

    def validate(self) -> "RunConfig":
        """Raise UsageError on values no run can use; return self for chaining."""
        _check_choice("prompt.method", self.prompt.method, METHODS)
        method = get_method(self.prompt.method)
        _check_choice("train.optimizer", self.train.optimizer, OPTIMIZERS)
        _check_choice("data.augment", self.data.augment, AUGMENTS)
        _check_choice("train.head_init", self.train.head_init, HEAD_INITS)
        _check_choice("prompt.init", self.prompt.init, PROMPT_INITS)
        if self.prompt.pool is not None:
            _check_choice("prompt.pool", self.prompt.pool, POOLS)
        if self.prompt.pool == "avg-prompts" and not method.prompts:
            raise UsageError(f"--pool avg-prompts averages prompt outputs, which --method {self.prompt.method} "
                             "has none of")
        if self.prompt.init == "tokens" and self.prompt.proj_dim:
            raise UsageError("prompt.init 'tokens' copies backbone tokens, which a prompt projection (proj_dim) "
                             "cannot take; set prompt.init: uniform to use one")
        _check_choice("train.device", self.train.device, DEVICES)
        _check_choice("train.select", self.train.select, SELECTS)
        _check_choice("train.refit_head", self.train.refit_head, HEAD_REFITS)
        _check_choice("train.balance", self.train.balance, BALANCES)
        if not 0.0 <= self.train.tau <= 10.0:
            raise UsageError("--tau must be in [0, 10]")
        if method.prompts and self.prompt.num_prompts is not None and self.prompt.num_prompts < 1:
            raise UsageError(f"--prompts must be at least 1 for {self.prompt.method}")
        if self.prompt.fourier_fraction and method.transform is None:  # 0: no Fourier prompts, what others have
            raise UsageError(f"--fourier-fraction applies to vfpt and vfpt-shallow, not --method {self.prompt.method}")
        if self.prompt.fourier_fraction is not None and not 0.0 <= self.prompt.fourier_fraction <= 1.0:
            raise UsageError("--fourier-fraction must be in [0, 1]")
        if not 0.0 <= self.prompt.resolved_dropout < 1.0:
            raise UsageError("prompt dropout must be in [0, 1)")
        if not 0.0 <= self.data.val_split < 1.0:
            raise UsageError("--val-split must be in [0, 1)")
        if self.train.epochs < 1 or self.train.batch_size < 1:
            raise UsageError("--epochs and --batch-size must be at least 1")
        for flag, value in (("--lr", self.train.lr), ("--head-lr", self.train.head_lr)):
            if value is not None and not value >= 0:
                raise UsageError(f"{flag} must be zero or positive, not {value}")
        if not self.train.weight_decay >= 0:
            raise UsageError(f"--weight-decay must be zero or positive, not {self.train.weight_decay}")
        if self.train.patience < 0 or (self.data.workers is not None and self.data.workers < 0):
            raise UsageError("--patience and --workers must be zero or positive")
        if self.train.warmup_epochs is not None and self.train.warmup_epochs < 0:
            raise UsageError("train.warmup_epochs must be zero or positive")
        _check_choice("data.format", self.data.format, DATA_FORMATS)
        _check_choice("train.loss", self.train.loss, LOSSES)
        threshold = self.train.threshold
        if threshold != TUNED and not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool)
                                       and 0.0 <= threshold <= 1.0):
            raise UsageError(f"--threshold must be in [0, 1] (or train.threshold: {TUNED}), not {threshold!r}")
        sep = self.data.label_sep
        if not isinstance(sep, str) or not 0 < len(sep) <= MAX_LABEL_SEP or any(c in sep for c in "\r\n\""):
            raise UsageError(f"--label-sep must be 1 to {MAX_LABEL_SEP} characters without quotes or line breaks")
        shots = self.data.shots
        if shots not in (ALL_SHOTS, None) and not (isinstance(shots, int) and not isinstance(shots, bool) and shots >= 1):
            raise UsageError(f"--shots must be at least 1 (or data.shots: {ALL_SHOTS}), not {shots!r}")
        if self.backbone.img_size is not None and self.backbone.img_size < 8:
            raise UsageError("--img-size must be at least 8")
        return self


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> RunConfig:
    """Defaults, then the YAML file at `path`, then `overrides` ({"train.lr": 0.1, ...}).

    Override values of None mean "flag not given" and are ignored, so CLI defaults never mask YAML.
    """
    config = RunConfig()
    if path is not None:
        try:
            raw = yaml.safe_load(Path(path).read_text()) or {}
        except OSError as exc:
            raise UsageError(f"cannot read config {path}: {exc.strerror}") from None
        except yaml.YAMLError as exc:
            raise UsageError(f"config {path} is not valid YAML: {exc}") from None
        if not isinstance(raw, dict):
            raise UsageError(f"config {path} must be a mapping of sections")
        apply_overrides(config, _flatten(raw))
    apply_overrides(config, {k: v for k, v in (overrides or {}).items() if v is not None})
    return config.validate()


def apply_overrides(config: RunConfig, flat: dict[str, Any]) -> None:
    """Set dotted keys ("train.lr") on `config`; unknown keys are a UsageError naming them."""
    sections = {f.name for f in fields(config)}
    for key, value in flat.items():
        section_name, _, attr = key.partition(".")
        if section_name not in sections:
            raise UsageError(f"unknown config section '{section_name}' (expected one of {sorted(sections)})")
        section = getattr(config, section_name)
        names = {f.name for f in fields(section)}
        if attr not in names:
            raise UsageError(f"unknown config key '{key}' (section '{section_name}' has {sorted(names)})")
        setattr(section, attr, value)


def _flatten(raw: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for section, values in raw.items():
        if not isinstance(values, dict):
            raise UsageError(f"config section '{section}' must be a mapping")
        for attr, value in values.items():
            flat[f"{section}.{attr}"] = value
    return flat


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UsageError(f"{name} must be one of {', '.join(choices)}, not '{value}'")

