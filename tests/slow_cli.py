"""`python tests/slow_cli.py ATTACK[@EPS] SECONDS harden-args...`: the harden command line with ATTACK made slow (each
call sleeps SECONDS first, then runs the real attack; with @EPS only the calls at that eps, e.g. one point of an eps
sweep), so that a test can signal a process while it is in a phase that uses that attack (the patch report's
apgd-ce, validation's pgd, an eval chain or its sweep). SECONDS is long enough for the test's own reader, lagging on
a loaded machine, to send its signal before the phase ends."""
import sys
import time

from hardener import attacks as A

name, _, at = sys.argv[1].partition("@")
seconds = float(sys.argv[2])
real = A.REGISTRY[name]


def build(model, spec):
    inner = real.build(model, spec)
    if at and abs(spec.eps - float(at)) > 1e-9:
        return inner

    def run(x, y):
        time.sleep(seconds)
        return inner(x, y)
    return run


A.REGISTRY[name] = A.AttackInfo(name, build, real.kind, real.steps, real.min_classes, real.train_radius)
sys.argv = ["harden", *sys.argv[3:]]

from hardener.cli.app import run  # noqa: E402

run()
