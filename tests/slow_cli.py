"""`python tests/slow_cli.py ATTACK SECONDS harden-args...`: the harden command line with ATTACK made slow (each call
sleeps SECONDS first, then runs the real attack), so that a test can signal a process while it is in a phase that
uses that attack (the patch report's apgd-ce, validation's pgd, an eval chain or its sweep)."""
import sys
import time

from hardener import attacks as A

name, seconds = sys.argv[1], float(sys.argv[2])
real = A.REGISTRY[name]


def build(model, spec):
    inner = real.build(model, spec)

    def run(x, y):
        time.sleep(seconds)
        return inner(x, y)
    return run


A.REGISTRY[name] = A.AttackInfo(name, build, real.kind, real.steps, real.min_classes, real.train_radius)
sys.argv = ["harden", *sys.argv[3:]]

from hardener.cli import run  # noqa: E402

run()
