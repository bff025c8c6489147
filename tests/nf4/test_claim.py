"""nf4/claim.py: another package named `kernels` earlier on sys.path (as Hugging Face's hub-kernels package is in
site-packages, where transformers >= 5.25 puts it, ahead of an editable install) does not shadow this project's
once llama, lora or train is imported, wherever Python starts."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run(code, tmp_path):
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True, exist_ok=True)
    (fake / "__init__.py").write_text("HUB = True\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path / "site"), ROOT]))
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout.strip().splitlines()


def test_other_kernels_package_does_not_shadow_ours(tmp_path):
    ours = os.path.join(ROOT, "kernels", "__init__.py")
    # the control: imported first, the other package wins (the situation the claim exists for)
    assert _run("import kernels; print(kernels.__file__)", tmp_path) == [str(tmp_path / "site" / "kernels" /
                                                                          "__init__.py")]
    for first in ("llama", "lora", "train"):
        out = _run(f"import {first}, kernels; print(kernels.__file__); from kernels import NF4Linear, nf4_matmul; "
                   "print(hasattr(kernels, 'HUB'))", tmp_path)
        assert out == [ours, "False"], (first, out)
