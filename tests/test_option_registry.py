"""Issue 31 item 2: each patch kind and training method owns its options. A config field declared with
`optspec.option(...)` states the option's default, range, help and flag once; the library, harden.toml, the command
line and `--help` are made from it, and a kind or method registered from outside (here, from this test) brings its
own options to all of them."""
from __future__ import annotations

import ast
import inspect
import json
from dataclasses import MISSING, dataclass, fields

import pytest
import torch
from safetensors import safe_open

import hardener
from hardener import methods as M
from hardener import patches as P
from hardener.cli import options as O
from hardener.cli.app import main
from hardener.errors import InputError
from hardener.io.checkpoint import MANIFEST_KEY
from hardener.options import optspec, owners
from hardener.options import validate as V
from hardener.options.patch_options import PatchOptions
from hardener.options.recipe import load_preset, preset_names
from hardener.training import fit as F

from conftest import ARCH, FAST_PATCH, make_data, trained_tiny


def _dest(spec: O.Opt) -> str:
    named = [d for d in spec.decls if not d.startswith("-")]
    return named[0] if named else spec.decls[0].split("/")[0].lstrip("-").replace("-", "_")


def test_each_option_default_and_range_is_stated_once():
    owned = owners.owned()  # raises when two owners declare one name differently
    assert {"rho", "delta", "fixer_rank", "width", "denoise_op", "loss_name", "beta", "phi", "betas"} <= set(owned)
    # every kind and method registered: its option fields' defaults are their declarations'
    configs = {k.config_cls for k in P.KINDS.values()} | {m.config_cls for m in M.REGISTRY.values()}
    for cls in configs:
        by_field = {f.name: f for f in fields(cls)}
        for field_name, name, spec in optspec.declared(cls):
            assert owned[name][1] is spec, (cls, name)  # one declaration per name (delta: fixer and pre-filter)
            assert by_field[field_name].default == spec.default, (cls, name)
            if isinstance(spec.default, (int, float)) and not isinstance(spec.default, bool):
                assert spec.ok(spec.default), (cls, name, spec.requirement())
    # no second place states them: not PatchOptions, not the CLI's own option table, not the range table
    assert not set(owned) & {f.name for f in fields(PatchOptions)}
    assert not set(owned) & {_dest(s) for s in O.PATCH_CORE}
    elsewhere = {_dest(s) for specs in (O.EVAL, O.CERTIFY, O.PREDICT, O.LAYERS, O.EXPORT) for s in specs}
    assert not set(owned) & set(V.OPTION_RULES) - elsewhere  # `sigma` is also harden certify's noise level
    assert not set(owned) & set(O.GROUP_OF)
    # the trainer's mirror fields (kept so records read as before) take their defaults from the declarations
    source = ast.parse(inspect.getsource(F.FitConfig))
    mirrored = {f.name for f in fields(F.FitConfig)} & {f for c in configs for f, _, _ in optspec.declared(c)}
    assert {"loss", "beta", "phi", "betas", "sigma"} <= mirrored
    for node in ast.walk(source):
        if isinstance(node, ast.AnnAssign) and node.target.id in mirrored:
            assert ast.unparse(node.value).startswith("owners.default("), ast.unparse(node)
    for field_name in mirrored:
        name = next(n for c in configs for f, n, _ in optspec.declared(c) if f == field_name)
        assert {f.name: f.default for f in fields(F.FitConfig)}[field_name] == owned[name][1].default
    # the command line's options are the declarations: one each, with the declared default
    made = {_dest(s): s for s in O.PATCH}
    assert len(made) == len(O.PATCH)
    for name, (_, spec) in owned.items():
        shown = ",".join(f"{v:g}" for v in spec.default) if isinstance(spec.default, tuple) else spec.default
        assert made[name].kwargs["default"] == shown and made[name].kwargs["help"] == spec.help, name
        assert O.group_of("patch", name) in O.GROUPS
    # the core options agree with PatchOptions and with their ranges; presets set values in range
    defaults = {f.name: f.default for f in fields(PatchOptions) if f.default is not MISSING}
    for spec in O.PATCH_CORE:
        if "default" in spec.kwargs and _dest(spec) in defaults:
            assert spec.kwargs["default"] == defaults[_dest(spec)], spec.decls
    for name, v in defaults.items():
        rule = V.OPTION_RULES.get(name)
        if rule and isinstance(v, (int, float)) and not isinstance(v, bool):
            assert rule[0](v), (name, v)
    for preset in preset_names():
        for name, v in load_preset(preset).options.items():
            if name in owned:
                owned[name][1].check(v, name)


def test_a_range_is_checked_from_its_declaration_naming_the_parameter_or_the_flag(runner, tiny_ckpt, tiny_data):
    from hardener.options.kind_options import AdvAmdConfig, FixerConfig

    # AdvAmd needs φ strictly inside (0, 1): one range, wherever it is checked
    with pytest.raises(InputError, match=r"^phi must be a number in \(0, 1\), got 1.0$"):
        PatchOptions.build(None, {"phi": 1.0})
    with pytest.raises(InputError, match=r"^--phi must be a number in \(0, 1\), got 0.0$"):
        AdvAmdConfig(phi=0.0)
    with pytest.raises(InputError, match=r"^--rho must be a finite positive number, got 0$"):
        FixerConfig(rho=0)
    with pytest.raises(InputError, match="^loss must be one of fixer, trades"):
        PatchOptions.build(None, {"loss": "hinge"})
    with pytest.raises(InputError, match="^betas must be three non-negative numbers"):
        PatchOptions.build(None, {"betas": "1,2"})
    assert PatchOptions.build(None, {"betas": "1,2,3"})[0].betas == (1.0, 2.0, 3.0)
    r = runner.invoke(main, ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--phi", "1"])
    assert r.exit_code == 2 and "--phi must be a number in (0, 1), got 1.0" in r.output, r.output


# ---------------------------------------------------------------- a kind and a method from outside, with options


@dataclass
class GateConfig:
    gate_init: float = optspec.option(0.0, lo=-1, hi=1, help="Initial gate of gate patches.")


class Gate(P.PatchKind):
    """h -> h + strength · gate · conv1x1(h), the conv zero-initialised: a fresh patch is the identity."""

    def __init__(self, channels: int, config: GateConfig) -> None:
        super().__init__()
        self.channels, self.config, self.strength = channels, config, 1.0
        self.gate = torch.nn.Parameter(torch.full((), float(config.gate_init)))
        self.conv = torch.nn.Conv2d(channels, channels, 1)
        torch.nn.init.zeros_(self.conv.weight)
        torch.nn.init.zeros_(self.conv.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.strength * self.gate * self.conv(h)


@dataclass
class WeightedConfig:
    adv_weight: float = optspec.option(1.0, lo=0, help="Weight of the adversarial CE of weighted-pair training.")
    tag: str | None = optspec.option(None, help="A label of the run (not given: none, and the record names none).")


SEEN: list[float] = []  # the adv_weight each optimiser step used


class WeightedPair(M.Method):
    def objective(self, b: M.Batch) -> dict[str, torch.Tensor]:
        SEEN.append(self.options.adv_weight)
        ce_clean = torch.nn.functional.cross_entropy(b.out_clean, b.y)
        ce_adv = torch.nn.functional.cross_entropy(b.out_adv, b.y)
        return {"loss": ce_clean + self.options.adv_weight * ce_adv, "ce_clean": ce_clean, "ce_adv": ce_adv}


def _register():
    P.register_patch_kind("gate", placement="output", config_cls=GateConfig)(Gate)
    M.register_method("weighted-pair", config_cls=WeightedConfig)(WeightedPair)


def test_a_registered_kind_and_method_bring_their_options_to_the_library(registries):
    _register()
    x, y = make_data(n=60, seed=0)
    x = x.float() / 255
    SEEN.clear()
    patched = hardener.patch(trained_tiny(), (x, y), recipe=None, method="gate,weighted-pair", at="block", eps=0.1,
                             epochs=1, steps=1, batch_size=32, gate_init=0.5, adv_weight=2.0, tag="t1",
                             progress=False)
    assert patched.patches["block"].config.gate_init == 0.5 and set(SEEN) == {2.0}
    assert patched.training_record["config"]["adv_weight"] == 2.0 and patched.training_record["config"]["tag"] == "t1"
    with pytest.raises(InputError, match="^tag must be a string, got 3$"):
        hardener.patch(trained_tiny(), (x, y), recipe=None, method="weighted-pair", tag=3)
    with pytest.raises(InputError, match=r"^gate_init must be a number in \[-1, 1\], got 5$"):
        hardener.patch(trained_tiny(), (x, y), recipe=None, method="gate", at="block", gate_init=5)
    with pytest.raises(InputError, match="unknown option 'gate_inti'"):
        hardener.patch(trained_tiny(), (x, y), recipe=None, method="gate", at="block", gate_inti=0.5)

    @dataclass
    class Clash:  # another owner declaring `gate_init` anew: refused, the registry as it was
        gate_init: float = optspec.option(0.5, help="Another gate.")

    with pytest.raises(TypeError, match="gate_init"):
        P.register_patch_kind("gate2", config_cls=Clash)(type("Gate2", (Gate,), {}))
    assert "gate2" not in P.KINDS


def test_a_registered_kind_and_method_bring_their_options_to_the_cli_and_harden_toml(registries, runner, tiny_ckpt,
                                                                                     tiny_data, tmp_path):
    _register()
    out = runner.invoke(main, ["patch", "--help"]).output
    recipe, training = (out.split(f"\n{t}:\n")[1].split("\n\n")[0] for t in ("Recipe", "Training"))
    assert "--gate-init FLOAT" in recipe and "Initial gate of gate patches." in recipe
    assert "--adv-weight FLOAT" in training and "[default: 1.0]" in training and "--tag TEXT" in training
    config = tmp_path / "harden.toml"
    config.write_text("[patch]\nadv_weight = 3.0\n")
    dest = tmp_path / "gate.hardened.safetensors"
    SEEN.clear()
    args = ["patch", str(tiny_ckpt), "--arch", ARCH, "--data", str(tiny_data), "--subset", "0.5", "--method",
            "gate,weighted-pair", "--at", "block", "--out", str(dest), "--config", str(config), *FAST_PATCH]
    r = runner.invoke(main, [*args, "--gate-init", "0.25"])
    assert r.exit_code == 0, r.output
    assert SEEN and set(SEEN) == {3.0}
    with safe_open(str(dest), framework="pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    assert manifest["patches"][0]["kind"] == "gate" and manifest["patches"][0]["gate_init"] == 0.25
    assert manifest["training"]["config"]["adv_weight"] == 3.0 and "tag" not in manifest["training"]["config"]
    r = runner.invoke(main, [*args, "--gate-init", "5", "--force"])
    assert r.exit_code == 2 and "--gate-init must be a number in [-1, 1], got 5.0" in r.output, r.output
    # the other way round: the kind's option from harden.toml, the method's from its flag
    config.write_text("[patch]\ngate_init = -0.5\n")
    SEEN.clear()
    r = runner.invoke(main, [*args, "--adv-weight", "1.5", "--force"])
    assert r.exit_code == 0, r.output
    with safe_open(str(dest), framework="pt") as f:
        manifest = json.loads(f.metadata()[MANIFEST_KEY])
    assert manifest["patches"][0]["gate_init"] == -0.5 and manifest["training"]["config"]["adv_weight"] == 1.5
    assert set(SEEN) == {1.5}


def test_eval_and_certify_defaults_are_stated_once():
    """Issue 31: `harden eval`'s and `harden certify`'s defaults live in `options.defaults`; the command line's
    options, the library's keywords and the runs' configs read them there and state none of their own."""
    from hardener import api
    from hardener import attacks as A
    from hardener.certification.smoothing import SmoothingConfig
    from hardener.evaluation.threats import EvalConfig
    from hardener.options import defaults as D

    def sig(fn):
        return {n: p.default for n, p in inspect.signature(fn).parameters.items()}

    ev, ce, cfg = sig(api.evaluate), sig(api.certify), EvalConfig()
    assert ev["attacks"] == D.EVAL["attack"] and cfg.attacks == D.EVAL["attack"].split(",")
    assert cfg.eps == A.parse_eps(D.EVAL["eps"]) and cfg.threats == api.parse_threats(D.EVAL["threat"])
    for k in ("eps", "norm", "threat", "batch_size", "seed", "precision"):
        assert ev[k] == D.EVAL[k], k
    for k in ("norm", "restarts", "queries", "batch_size", "seed", "precision"):
        assert getattr(cfg, k) == D.EVAL[k], k
    assert {k: ce[k] for k in D.CERTIFY} == D.CERTIFY
    assert {k: getattr(SmoothingConfig(), k) for k in D.CERTIFY} == D.CERTIFY
    cli = {_dest(s): s.kwargs.get("default") for s in O.EVAL}
    assert {k: cli[k] for k in ("eps", "norm", "restarts", "queries", "threat", "batch_size", "precision")} == \
        {k: D.EVAL[k] for k in ("eps", "norm", "restarts", "queries", "threat", "batch_size", "precision")}
    cli = {_dest(s): s.kwargs.get("default") for s in O.CERTIFY}
    assert {"sigma": cli["sigma"], "n0": cli["n0"], "n": cli["n_samples"], "alpha": cli["alpha"],
            "batch_size": cli["batch_size"]} == {k: D.CERTIFY[k] for k in ("sigma", "n0", "n", "alpha", "batch_size")}
    # and none states its own: no default literal in the signatures, the configs or the options' sources
    heads = [inspect.getsource(api.evaluate).split(") ->")[0], inspect.getsource(api.certify).split(") ->")[0],
             inspect.getsource(EvalConfig), inspect.getsource(SmoothingConfig)]
    for literal in ('"8/255"', "8 / 255", '"apgd-ce"', "5000", "100_000", "0.001", "= 0.25", '"Linf"', '"all"'):
        assert not [h for h in heads if literal in h], literal
    options_src = inspect.getsource(O)
    for literal in ("default=5000", "default=100_000", "default=0.001", "default=0.25"):
        assert literal not in options_src, literal


def test_every_builtin_owner_of_options_is_known_without_torch():
    """`harden patch --help` and its flags are made before torch loads, from `kind_options.BUILTIN`: a built-in patch
    kind or method whose config declares options but is missing there would lose its flags in a real `harden`
    process (an in-process CLI test would not notice: the registries are loaded there)."""
    from hardener.options import kind_options

    known = {cls for _, cls in kind_options.BUILTIN}
    builtin = [k for k in P.KINDS.values() if k.__module__.startswith("hardener.")] + \
        [m for m in M.REGISTRY.values() if m.__module__.startswith("hardener.")]
    missing = [c.__name__ for c in builtin if optspec.declared(c.config_cls) and c.config_cls not in known]
    assert not missing, f"add their configs to kind_options.BUILTIN: {missing}"
