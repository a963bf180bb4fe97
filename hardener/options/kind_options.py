"""The option dataclasses of the built-in patch kinds and training methods, each option's default, range, help and flag
stated once in its field (`optspec.option`). Torch-free, so that `harden --help` lists them without importing torch;
the kinds and methods (`hardener.patches.fixer`, `hardener.methods.advamd`, ...) register them as their `config_cls`.
Adding an option to a kind or method is one field here (or in the external config of a kind or method registered
from outside)."""
from __future__ import annotations

from dataclasses import dataclass

from ..errors import InputError
from .choices import ACTIVATIONS, DENOISE_OPS, LOSSES, PREFILTER_DESIGNS
from .optspec import Option, Options, option

# fixers and pre-filters share their strength: one declaration
DELTA = Option(1.0, help="Strength δ of fixer and pre-filter patches.")


@dataclass
class FixerConfig(Options):
    rho: float = option(4.0, lo=0, open_lo=True, help="Channel compression ρ.")
    delta: float = DELTA.field()
    act: str = option("linear", choices=ACTIVATIONS, help="Fixer activation ζ.")
    final_relu: bool = option(False, help="ReLU after the fixer (sites with non-negative output only).")
    rank: int = option(0, lo=0, hi=4096, name="fixer_rank",
                       help="Rank of a fixer's 3x3 conv, factored into a 3x3 conv to R channels and a 1x1 conv "
                            "(0: not factored).")

    def __post_init__(self) -> None:
        self.final_relu = bool(self.final_relu)
        super().__post_init__()


@dataclass
class DenoiseConfig(Options):
    op: str = option("nonlocal-gaussian", choices=DENOISE_OPS, name="denoise_op", flag="--denoise",
                     help="Denoising operation of denoise patches.")
    chunk: int = 1024  # query positions per chunk (non-local Gaussian)


@dataclass
class PrefilterConfig(Options):
    width: int = option(32, lo=1, hi=4096, help="Channels inside a prefilter patch (a checkpoint holds at most 4096).")
    delta: float = DELTA.field()
    stride: int = option(1, lo=1, hi=8, name="prefilter_stride",
                         help="Stride of a prefilter patch's first conv: its middle conv runs at 1/S of the input's "
                              "resolution (1/S² of the multiply-adds).")
    design: str = option("plain", choices=PREFILTER_DESIGNS, name="prefilter_design",
                         help="A prefilter patch's design: plain; separable (depthwise-separable middle conv); shuffle "
                              "(every conv at 1/S of the resolution, needs --prefilter-stride 2+, a pixel shuffle back "
                              "to full resolution).")

    def __post_init__(self) -> None:
        if isinstance(self.width, float) and self.width.is_integer():
            self.width = int(self.width)
        self.delta = float(self.delta) if isinstance(self.delta, int) and not isinstance(self.delta, bool) else \
            self.delta
        super().__post_init__()
        if self.design == "shuffle" and self.stride < 2:
            raise InputError("--prefilter-design shuffle works at 1/S of the resolution: give --prefilter-stride 2 "
                             "or more")


@dataclass
class LoraConfig(Options):
    rank: int = option(4, lo=1, hi=4096, name="lora_rank",
                       help="Rank R of lora patches: the delta B·A added to a layer's weight, B (out × R) and A (R × "
                            "the rest), merged into the weight when served (no added multiply-adds per image).")


@dataclass
class PairConfig(Options):
    """Options of the clean + second-input objective."""

    loss: str = option("fixer", choices=LOSSES, name="loss_name", flag="--loss",
                       help="fixer: CE on clean and adversarial inputs; trades: CE on clean + "
                            "β·KL(clean‖adversarial); rslad: the --teacher's soft labels on the clean input as the "
                            "target of both (Zi et al. 2021), no CE.")
    beta: float = option(6.0, lo=0, help="TRADES weight β.")
    teacher_weight: float = option(5 / 6, lo=0, hi=1, open_lo=True,
                                   help="RSLAD's weight of KL(teacher(x) ‖ model(x_adv)); the clean input's KL gets "
                                        "1 − it (default 5/6).")


def parse_betas(text: str | tuple, what: str = "--betas") -> tuple[float, ...]:
    """`1,1,1` -> (1.0, 1.0, 1.0): AdvAmd's β1..β3."""
    try:
        vals = tuple(float(v) for v in (text.split(",") if isinstance(text, str) else text))
    except (TypeError, ValueError):
        vals = ()
    if len(vals) != 3 or any(not v >= 0 for v in vals):
        raise InputError(f"{what} must be three non-negative numbers like 1,1,1, got '{text}'")
    return vals


@dataclass
class AdvAmdConfig(Options):
    phi: float = option(0.5, lo=0, hi=1, open_lo=True, open_hi=True,
                        help="AdvAmd mediate coefficient φ (paper: 0.7 FGSM, 0.6 DeepFool, 0.5 iterative attacks).")
    betas: tuple[float, float, float] = option((1.0, 1.0, 1.0), lo=0, parse=parse_betas,
                                               help="AdvAmd loss weights β1,β2,β3.")
    sigma: float = option(0.0, lo=0, help="AdvAmd: stop once an epoch's mean loss is below σ.")

    def __post_init__(self) -> None:
        self.betas = tuple(float(b) for b in parse_betas(self.betas))  # type: ignore[assignment]
        super().__post_init__()


# (`--help` group, config) of the built-in owners, in the order `--help` lists their options
BUILTIN = [("recipe", DenoiseConfig), ("recipe", FixerConfig), ("recipe", PrefilterConfig), ("recipe", LoraConfig),
           ("training", PairConfig), ("training", AdvAmdConfig)]
