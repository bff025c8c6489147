"""benchmarks/device_plan.sh (the one-call GPU plan) refers to files that exist and to flags its scripts accept:
a typo there would cost a device call, which a session may get only one of."""
import os
import re
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PLAN = os.path.join(ROOT, "benchmarks", "device_plan.sh")


def test_plan_parses_and_its_paths_exist():
    subprocess.run(["bash", "-n", PLAN], check=True)
    text = open(PLAN, encoding="utf-8").read()
    paths = set(re.findall(r"\b((?:tests|benchmarks)/[\w/.-]+\.py)\b", text))
    assert len(paths) >= 6, paths
    missing = [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]
    assert not missing, f"device_plan.sh names files that do not exist: {missing}"


def test_e2e_accepts_the_plan_flags():
    from benchmarks import e2e

    text = open(PLAN, encoding="utf-8").read()
    cmd = re.search(r"python -m benchmarks\.e2e (.*?)\n\s*--out", text, re.S).group(1).split()
    flags = [c for c in cmd if c.startswith("--")]
    assert "--ab-prefetch" in flags and "--ab-adds" in flags
    parser_flags = set()
    orig = e2e.argparse.ArgumentParser.add_argument

    def spy(self, *names, **kw):
        parser_flags.update(n for n in names if n.startswith("--"))
        return orig(self, *names, **kw)

    e2e.argparse.ArgumentParser.add_argument = spy
    try:
        try:
            e2e.main(["--help"])
        except SystemExit:
            pass
    finally:
        e2e.argparse.ArgumentParser.add_argument = orig
    assert set(flags) <= parser_flags, set(flags) - parser_flags
