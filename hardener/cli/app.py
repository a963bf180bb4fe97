"""The `harden` command line: parse options, call the command's library function (`hardener.cli.commands`), map errors
to exit codes. The options themselves are data (`hardener.cli.options`); this is the one module that imports click.

Exit codes: 0 ok; 1 a --fail-under threshold missed; 2 usage or input error; 3 run failed
(NaN loss, out of memory, disk full); 130 interrupted.
"""
from __future__ import annotations

import errno
import importlib
import re
import sys
import textwrap
from typing import Any, Callable

import click
from click.core import ParameterSource

from ..errors import HardenError, InputError, Interrupted, UsageError
from ..options.recipe import preset_help
from ..version import __version__
from . import commands
from . import options as O
from .config import command_defaults
from .signals import held, sigterm_as_interrupt


class _Parsed(click.ParamType):
    """A click type around one of `options`' parsed types (`BatchSize`, `PixelLevel`): its name, its `parse`, and
    its ValueError as click's one-line usage error."""

    def __init__(self, kind: Any) -> None:
        self.kind, self.name = kind, kind.name

    def convert(self, value, param, ctx):
        try:
            return self.kind.parse(value)
        except ValueError as e:
            self.fail(str(e), param, ctx)


def _click_type(t: Any) -> Any:
    if isinstance(t, (O.BatchSize, O.PixelLevel)):
        return _Parsed(t)
    if isinstance(t, O.Choice):
        return click.Choice(list(t))
    if isinstance(t, O.PathType):
        return click.Path(exists=t.exists, file_okay=t.file_okay, dir_okay=t.dir_okay)
    return t


def _click_option(spec: O.Opt) -> click.Option:
    kwargs = dict(spec.kwargs)
    if "type" in kwargs:
        kwargs["type"] = _click_type(kwargs["type"])
    return click.Option(spec.decls, **kwargs)


def with_options(specs: tuple[O.Opt, ...]) -> Callable:
    """Decorator: the options of `specs` (data, `hardener.cli.options`) as click options, in their order."""
    def apply(f: Callable) -> Callable:
        f.__click_params__ = [*getattr(f, "__click_params__", []), *(_click_option(s) for s in reversed(specs))]
        return click.argument("model", required=False)(f)
    return apply


class ConfigCommand(click.Command):
    """A click command whose defaults come from the config file, then from a `--preset` (command line first,
    then config file, then preset, then the built-in defaults); a missing argument shows the usage lines."""

    def make_context(self, info_name, args, parent=None, **extra):
        params = {p.name: bool(getattr(p, "multiple", False)) for p in self.params if p.name}
        try:
            defaults = command_defaults(self.name or "", list(args), params)
        except InputError as e:
            e.show()
            raise SystemExit(e.exit_code) from None
        if defaults:
            extra["default_map"] = {**defaults, **(extra.get("default_map") or {})}
        return super().make_context(info_name, args, parent=parent, **extra)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UsageError as e:
            raise click.UsageError(e.message, ctx) from None

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The options in their groups (`options.GROUPS`), then the command's examples (`options.EXAMPLES`)."""
        rows: dict[str, list[tuple[str, str]]] = {}
        help_option = self.get_help_option(ctx)
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx) if isinstance(p, click.Option) else None
            if record:
                group = "run" if p is help_option else O.group_of(self.name or "", p.name or "")
                rows.setdefault(group, []).append(record)
        for group, title in [*O.GROUPS.items(), ("", "Other options")]:
            if group in rows:
                with formatter.section(title):
                    formatter.write_dl(rows[group])
        with formatter.section("Examples"):
            width = max(40, (formatter.width or 80) - formatter.current_indent - 2)
            for i, (what, command) in enumerate(O.EXAMPLES.get(self.name or "", [])):
                if i:
                    formatter.write_paragraph()
                formatter.write_text(f"# {what}")
                # as a shell takes it: long commands broken before an option, with backslashes
                lines = [""]
                for part in re.split(r" (?=--)", command):
                    if lines[-1] and len(lines[-1]) + 1 + len(part) > width:
                        lines.append("    ")
                    lines[-1] += (" " if lines[-1].strip() else "") + part
                formatter.write(textwrap.indent(" \\\n".join(lines), " " * formatter.current_indent) + "\n")


def _run(command: str) -> None:
    """Run `hardener.cli.commands.<command>` with the current command's options, its boundary checks and which options the
    command line set. The command's module (and torch with it) is imported here, when the command runs: `--help` and
    a usage error never import it."""
    with held():  # the command's imports (torch among them: boundary's too) are not cut in half by an interrupt
        from . import boundary as B

        module = importlib.import_module(f".commands.{command}", __package__)
    ctx = click.get_current_context()
    call = commands.Call(dict(ctx.params), check_run=lambda outputs, force: B.check_run(ctx, outputs, force),
                         given=lambda name: ctx.get_parameter_source(name) == ParameterSource.COMMANDLINE)
    module.run(call)


class _CliError(click.ClickException):
    """A library error (`HardenError`) as click shows it: `Error: <message>`, the error's exit code."""

    def __init__(self, e: HardenError) -> None:
        super().__init__(e.format_message())
        self.exit_code = e.exit_code


class HardenGroup(click.Group):
    """The command group: library errors raised by a command become one `Error:` line and their exit code."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except HardenError as e:
            raise _CliError(e) from None
        except KeyboardInterrupt:  # SIGINT or SIGTERM where no phase saves anything: one line, the locks released
            raise _CliError(Interrupted("interrupted")) from None
        finally:  # output locks of the command (boundary is loaded once a command ran, not for --help)
            boundary = sys.modules.get("hardener.cli.boundary")
            if boundary is not None:
                boundary.release_locks()


@click.group(cls=HardenGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="harden")
def main() -> None:
    """Harden frozen PyTorch classifiers against adversarial examples with small trainable patches.

    Exit codes: 0 ok, 1 a --fail-under threshold missed, 2 bad input, 3 run failed, 130 interrupted.
    """


@main.command(cls=ConfigCommand)
@with_options(O.LAYERS)
def layers(**kw):
    """List named layers: type, output shape, parameters, and whether each is a valid fixer site."""
    _run("layers")


class PatchCommand(ConfigCommand):
    """`harden patch`: the options of patch kinds and methods (`cli.options.owned_opts`) are made when the command runs,
    from the kinds and methods registered then (one registered from outside brings its options, to harden.toml too);
    its epilog (what each preset sets) is built when --help shows it, from the options' own flags and defaults."""

    _owned: tuple = ((), [])  # (the declarations, their click options), made again when the declarations change
    _all: list | None = None  # the parameters: one list while the declarations stay (click appends to it, and pops)

    @property
    def params(self) -> list[click.Parameter]:
        specs = O.owned_opts()
        if specs != self._owned[0]:
            self._owned, self._all = (specs, [_click_option(s) for s in specs]), None
        if self._all is None:
            at = next(i for i, p in enumerate(self._core) if p.name == "preset") + 1
            self._all = [*self._core[:at], *self._owned[1], *self._core[at:]]
        return self._all

    @params.setter
    def params(self, value: list[click.Parameter]) -> None:
        self._core, self._all = value, None

    def format_epilog(self, ctx: click.Context, formatter) -> None:
        opts = [p for p in self.params if isinstance(p, click.Option)]
        self.epilog = preset_help({p.name: p.opts[0] for p in opts}, {p.name: p.default for p in opts})
        super().format_epilog(ctx, formatter)


@main.command(cls=PatchCommand)
@with_options(O.PATCH_CORE)
def patch(**kw):
    """Splice patches (fixers, denoise blocks, pre-filters, auxiliary BNs) into a frozen checkpoint, train them on
    a small subset, write the patched file and a quick report. With no method options the recipe is the white-box
    robust preset. Full fine-tuning methods (adv-train, advprop, advamd) write a new checkpoint instead, marked as
    a modified base."""
    _run("patch")


@main.command("eval", cls=ConfigCommand)
@with_options(O.EVAL)
def eval_cmd(**kw):
    """Evaluate robustness: attacks, threat models, per-sample worst case, sanity checks, gates."""
    _run("evaluate")


@main.command(cls=ConfigCommand)
@with_options(O.CERTIFY)
def certify(**kw):
    """Certified L2 robustness of the smoothed model (randomized smoothing, Cohen et al. 2019): per sample, the
    class and a radius within which no perturbation changes it, with probability 1 - alpha over the noise."""
    _run("certify")


@main.command(cls=ConfigCommand)
@with_options(O.PREDICT)
def predict(**kw):
    """Predict classes for inputs with a plain or patched checkpoint; --adaptive post-trains a copy per input.

    Prints `index<TAB>class<TAB>confidence` per input (class names where known), or JSON lines with --json.
    The checkpoint is never modified."""
    _run("predict")


@main.command(cls=ConfigCommand)
@with_options(O.EXPORT)
def export(**kw):
    """Export a patched checkpoint to a file that runs without harden ([0,1] inputs), checked in a fresh
    interpreter against the patched model's logits."""
    _run("export")


def run() -> None:
    """Console entry point: stable exit codes, no tracebacks for expected failures; SIGTERM stops any phase as
    Ctrl-C does (`signals`)."""
    try:
        with sigterm_as_interrupt():
            main.main(standalone_mode=False, prog_name="harden")
    except (click.ClickException, HardenError) as e:
        e.show()
        _exit(e.exit_code)
    except click.exceptions.Abort:
        _interrupted()
        _exit(130)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        _interrupted()
        _exit(130)
    except RuntimeError as e:
        if _gpu_out_of_memory(e):
            click.echo("Error: out of GPU memory: lower --batch-size or use --device cpu", err=True)
            sys.exit(3)
        if "can't allocate memory" in str(e):  # torch's CPU allocator: a plain RuntimeError
            click.echo("Error: out of memory (the CPU allocator refused a tensor): lower --batch-size, --width or "
                       "raise --rho", err=True)
            sys.exit(3)
        raise
    except MemoryError:
        click.echo("Error: out of memory: lower --batch-size or --subset", err=True)
        sys.exit(3)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            click.echo("Error: disk full: free space and run again", err=True)
            sys.exit(3)
        raise


def _exit(code: int) -> None:
    """sys.exit; for an interrupt, first clear CPython's flag that a KeyboardInterrupt raised inside exec() of a
    string sets even when it is caught (dataclasses and others exec while harden imports): with it set, the
    interpreter would end itself by SIGINT (-2) instead of exiting 130. A fresh exec() of a string resets it."""
    if code == 130:
        exec("None")  # noqa: S102 - a constant; see above
    sys.exit(code)


def _gpu_out_of_memory(e: BaseException) -> bool:
    """torch's CUDA out-of-memory error (torch is imported by then if a command ran; not imported for this)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(e, torch.cuda.OutOfMemoryError)


def _interrupted() -> None:
    from ..runtime.console import err_console  # rich: imported when needed, as torch is

    err_console.print("interrupted")
