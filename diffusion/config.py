"""Run configuration: one dataclass, validated on construction, and named presets.

    cfg = preset("digits", epochs=50)              # a preset with overrides
    cfg = cfg.replace(lr=1e-4)                     # validated again
    cfg = apply_overrides(cfg, ["dim_mults=1,2,4", "ot_lambda=0.1"])   # the CLI's --set

Every error names the field, e.g. ``ValueError: lr must be > 0, got -0.001``.
"""
from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, fields

from .data import DATASETS
from .methods import COUPLINGS, METHODS, SOLVERS
from .process import BETA_SCHEDULES, OBJECTIVES, TIMESTEP_SAMPLERS

AMP_MODES = ("none", "bf16", "fp16")
OT_SPACES = ("pixel", "feature")
OT_SQUASH = ("clamp", "tanh")


@dataclass
class DiffusionConfig:
    # data
    dataset: str = "digits"            # digits | mnist | cifar10
    data_path: typing.Optional[str] = None   # mnist: .npz file or torchvision root; cifar10: torchvision root
    pad_to_32: bool = False            # mnist: pad 28×28 to 32×32
    n_train: typing.Optional[int] = None     # balanced subset sizes (None: all)
    n_test: typing.Optional[int] = None
    n_val: typing.Optional[int] = None       # validation split held out of the training images (None: min(5000, 10%))
    # diffusion process
    timesteps: int = 1000
    beta_schedule: str = "linear"      # linear | cosine
    objective: str = "eps"             # eps | x0 | v
    timestep_sampler: str = "uniform"  # uniform | quadratic
    # generative method: "diffusion" (GaussianDiffusion, DDIM) or "flow" (flow matching, ODE)
    method: str = "diffusion"
    flow_coupling: str = "exact"       # exact | sinkhorn | independent (minibatch noise–image pairing)
    flow_sigma: float = 0.0            # σ_min of the paths x_s = (1−s)x0 + s·x1 + σ_min·z
    flow_blur: float = 1.0             # sinkhorn coupling blur (ε = blur², cost ½|x0−x1|²)
    flow_solver: str = "euler"         # euler | midpoint | heun (sample_steps steps)
    # model
    dim: int = 32
    dim_mults: tuple = (1, 2)
    resnet_blocks: int = 1
    attn_levels: tuple = ()
    dropout: float = 0.0
    class_cond: bool = False
    cond_drop_prob: float = 0.1
    # optimisation
    epochs: int = 100
    batch_size: int = 128
    lr: float = 2e-4
    ema_decay: float = 0.995
    grad_clip: float = 1.0             # max gradient norm (0: off)
    amp: str = "none"                  # none | bf16 | fp16 autocast (fp16 with a GradScaler)
    seed: int = 0                      # data splits, feature nets, and (unless train_seed) training
    train_seed: typing.Optional[int] = None  # model init, batch order, noise, OT references (None: seed)
    device: str = "auto"               # auto | cpu | cuda | cuda:N
    threads: int = 0                   # torch CPU threads (0: torch's default)
    # OT term  L = L_eps + λ(epoch)·Sinkhorn(x̂0, reference batch)
    ot_lambda: float = 0.0
    ot_blur: float = 0.35
    ot_p: int = 2
    ot_space: str = "pixel"            # pixel | feature
    ot_squash: str = "clamp"           # how x̂0 is brought to [-1, 1]: clamp | tanh
    ot_pool_size: int = 2000           # reference pool (training images), disjoint from each batch;
                                       # 0: the whole training set (with ot_ref_batch=2000: 2000 fresh
                                       # references per step from all training images outside the batch)
    ot_ref_batch: int = 0              # reference batch size (0: batch_size)
    ot_start_epoch: int = 0            # "MSE first, then OT": λ = 0 before this epoch
    ot_warmup_epochs: int = 0          # then λ ramps linearly to ot_lambda over this many epochs
    ot_max_t: typing.Optional[int] = None    # OT term only on samples with t < ot_max_t (None: all)
    init_from: typing.Optional[str] = None   # fine-tune: start from this checkpoint's weights
    # sampling, evaluation, output
    sample_steps: int = 50             # DDIM (or flow ODE) steps for grids and metrics
    sample_eta: float = 0.0
    eval_every: int = 1                # feature-space metrics every k epochs (0: only after the last)
    eval_final: bool = True            # metrics after the last epoch
    eval_n: int = 500                  # generated samples for metrics
    val_n: int = 1000                  # validation-split images for the validation loss
    metric_blur: float = 0.5           # Sinkhorn blur for feature-space OT metrics
    grid_n: int = 64
    feature_epochs: int = 20
    feature_path: typing.Optional[str] = None  # guide feature net cache (None: <out_dir>/../features/
                                       # <dataset>-<size>-guide.pt); the eval net's: the same with -eval
    out_dir: str = "runs/digits"
    ckpt_every: int = 1
    save_every: int = 0                # also keep checkpoint_<epoch>.pt every k epochs, a series (0: off)
    progress: bool = True

    def __post_init__(self):
        self.dim_mults = _int_tuple(self.dim_mults, "dim_mults")
        self.attn_levels = _int_tuple(self.attn_levels, "attn_levels")
        self.validate()

    def validate(self) -> None:
        def choice(name, options):
            if getattr(self, name) not in options:
                raise ValueError(f"{name} must be one of {options}, got {getattr(self, name)!r}")

        def check(name, ok, what):
            if not ok(getattr(self, name)):
                raise ValueError(f"{name} must be {what}, got {getattr(self, name)!r}")

        for name, f in self.__dataclass_fields__.items():
            v = getattr(self, name)
            if f.type in ("int", "float") and (isinstance(v, bool) or not isinstance(v, (int, float))):
                raise TypeError(f"{name} must be a number, got {v!r}")
        choice("dataset", DATASETS)
        choice("beta_schedule", BETA_SCHEDULES)
        choice("objective", OBJECTIVES)
        choice("timestep_sampler", TIMESTEP_SAMPLERS)
        choice("amp", AMP_MODES)
        choice("ot_space", OT_SPACES)
        choice("ot_squash", OT_SQUASH)
        choice("ot_p", (1, 2))
        choice("method", METHODS)
        choice("flow_coupling", COUPLINGS)
        choice("flow_solver", SOLVERS)
        pos = lambda v: v > 0  # noqa: E731
        nonneg = lambda v: v >= 0  # noqa: E731
        for name in ("timesteps", "dim", "resnet_blocks", "epochs", "batch_size", "sample_steps", "eval_n",
                     "val_n", "grid_n", "ckpt_every"):
            check(name, pos, "> 0")
        for name in ("lr", "ot_blur", "metric_blur", "flow_blur"):
            check(name, pos, "> 0")
        for name in ("flow_sigma", "grad_clip", "ot_lambda", "ot_start_epoch", "ot_warmup_epochs", "ot_ref_batch",
                     "ot_pool_size", "eval_every", "feature_epochs", "threads", "save_every"):
            check(name, nonneg, ">= 0")
        for name in ("dropout", "cond_drop_prob", "ema_decay"):
            check(name, lambda v: 0 <= v < 1, "in [0, 1)")
        check("sample_eta", nonneg, ">= 0")
        check("dim_mults", lambda v: len(v) > 0 and all(m > 0 for m in v), "a non-empty list of positive ints")
        check("attn_levels", lambda v: all(0 <= i < len(self.dim_mults) for i in v),
              f"level indices in [0, {len(self.dim_mults)})")
        if self.method == "flow" and self.timesteps < 2:
            raise ValueError(f"timesteps must be >= 2 for method 'flow', got {self.timesteps}")
        if self.sample_steps > self.timesteps:
            raise ValueError(f"sample_steps must be <= timesteps ({self.timesteps}), got {self.sample_steps}")
        if self.ot_max_t is not None and not 0 < self.ot_max_t <= self.timesteps:
            raise ValueError(f"ot_max_t must be in (0, timesteps={self.timesteps}], got {self.ot_max_t}")
        for name in ("n_train", "n_test", "n_val"):
            if getattr(self, name) is not None:
                check(name, pos, "> 0 or None")
        if self.dataset in ("mnist", "cifar10") and not self.data_path:
            raise ValueError(f"data_path is required for dataset {self.dataset!r} "
                             "(an mnist.npz file, or a torchvision root)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def replace(self, **changes) -> "DiffusionConfig":
        unknown = set(changes) - set(self.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown config field(s): {sorted(unknown)}; fields: {sorted(self.__dataclass_fields__)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _int_tuple(v, name):
    if isinstance(v, str):
        v = [s for s in v.replace("(", "").replace(")", "").split(",") if s.strip()]
    try:
        return tuple(int(m) for m in v)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of ints such as 1,2,4, got {v!r}") from None


PRESETS = {
    # 8×8 sklearn digits on a CPU in minutes (feature net, training and evaluation included)
    "digits": dict(dataset="digits", dim=32, dim_mults=(1, 2), resnet_blocks=1, epochs=40, batch_size=128,
                   lr=1e-3, ema_decay=0.995, eval_every=0, eval_n=500, feature_epochs=20, threads=1,
                   out_dir="runs/digits"),
    # MNIST 28×28 on a CPU in under 30 minutes: a 6000-image balanced subset, small UNet
    "mnist-quick": dict(dataset="mnist", data_path="../shared/data/mnist.npz", n_train=6000, n_test=1000,
                        dim=32, dim_mults=(1, 2, 2), resnet_blocks=1, epochs=12, batch_size=64, lr=1e-3,
                        ema_decay=0.995, eval_every=0, eval_n=200, val_n=500, feature_epochs=3,
                        out_dir="runs/mnist-quick"),
    # the reference setting for a GPU
    "mnist": dict(dataset="mnist", data_path="../shared/data/mnist.npz", dim=64, dim_mults=(1, 2, 4),
                  resnet_blocks=2, attn_levels=(2,), epochs=35, batch_size=128, lr=2e-4, ema_decay=0.999,
                  amp="bf16", eval_every=5, eval_n=2000, feature_epochs=5, out_dir="runs/mnist"),
}

# the digits preset with flow matching, noise and images paired by the exact minibatch OT permutation
PRESETS["digits-flow"] = {**PRESETS["digits"], "method": "flow", "flow_coupling": "exact", "out_dir": "runs/digits-flow"}


def preset(name: str, **overrides) -> DiffusionConfig:
    """The named preset (digits, digits-flow, mnist-quick, mnist) with field overrides."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; presets: {sorted(PRESETS)}")
    unknown = set(overrides) - set(DiffusionConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown config field(s): {sorted(unknown)}")
    return DiffusionConfig(**{**PRESETS[name], **overrides})


def parse_value(name: str, text: str):
    """Parse a command-line string for field ``name`` to the field's type."""
    f = DiffusionConfig.__dataclass_fields__.get(name)
    if f is None:
        raise ValueError(f"unknown config field {name!r}; fields: {sorted(DiffusionConfig.__dataclass_fields__)}")
    typ = str(f.type)
    if "Optional" in typ and text.lower() in ("none", "null", ""):
        return None
    try:
        if "tuple" in typ:
            return _int_tuple(text, name)
        if "bool" in typ:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if "int" in typ:
            return int(text)
        if "float" in typ:
            return float(text)
    except ValueError:
        raise ValueError(f"{name}: cannot parse {text!r} as {typ}") from None
    return text


def apply_overrides(cfg: DiffusionConfig, items) -> DiffusionConfig:
    """``["key=value", ...]`` → a new validated config."""
    changes = {}
    for item in items or ():
        if "=" not in item:
            raise ValueError(f"override must be key=value, got {item!r}")
        k, v = item.split("=", 1)
        k = k.strip().replace("-", "_")
        changes[k] = parse_value(k, v.strip())
    return cfg.replace(**changes)


def field_names():
    return [f.name for f in fields(DiffusionConfig)]


