"""Write a copy of a binary wheel without the native libraries a device does not load (device runs carry their
wheels, at most 64 MiB with the tree: bitsandbytes 0.50.2 is 42 MB, 5 MB with its CUDA 13.0 library alone).

    python benchmarks/slim_wheel.py .whl/bitsandbytes-0.50.2-*.whl --keep cuda130 --out-dir .whl-slim

A file whose name ends in .so is kept when it contains one of the --keep strings or none of the --drop-if
markers (default: cuda, rocm, xpu, hip: the accelerator builds); every other file is kept. RECORD lists what
remains (pip installs from it as from the original).
"""
import argparse
import base64
import hashlib
import os
import sys
import tempfile
import zipfile


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}"


def slim(wheel: str, keep: list[str], drop_if: list[str], out_dir: str) -> str:
    if not zipfile.is_zipfile(wheel):
        raise SystemExit(f"slim_wheel: {wheel} is not a wheel (zip) file")
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.basename(wheel))
    if os.path.abspath(out) == os.path.abspath(wheel):
        raise SystemExit(f"slim_wheel: --out-dir would overwrite {wheel}")
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        records = [n for n in names if n.endswith(".dist-info/RECORD")]
        if len(records) != 1:
            raise SystemExit(f"slim_wheel: {wheel} has {len(records)} RECORD files, expected 1")

        def wanted(n):
            base = os.path.basename(n)
            if not base.endswith(".so") and ".so." not in base:
                return True
            return any(k in base for k in keep) or not any(d in base for d in drop_if)

        kept = [n for n in names if wanted(n) and n != records[0]]
        fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".part")
        os.close(fd)
        try:
            with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
                lines = []
                for n in kept:
                    data = src.read(n)
                    dst.writestr(src.getinfo(n), data)
                    lines.append(_record_line(n, data))
                lines.append(f"{records[0]},,")
                dst.writestr(records[0], "\n".join(lines) + "\n")
            os.replace(tmp, out)  # a failure leaves no half-written wheel under the final name
        except BaseException:
            os.unlink(tmp)
            raise
        dropped = sorted(set(names) - set(kept) - {records[0]})
    print(f"{out}: kept {len(kept)} files, dropped {len(dropped)}: {', '.join(os.path.basename(d) for d in dropped)}"
          f" ({os.path.getsize(wheel) / 2**20:.1f} -> {os.path.getsize(out) / 2**20:.1f} MiB)")
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("wheels", nargs="+")
    ap.add_argument("--keep", action="append", default=[], help="keep native libraries whose name contains this")
    ap.add_argument("--drop-if", action="append", default=None,
                    help="native libraries whose name contains this are dropped unless kept (default: cuda, rocm, "
                         "xpu, hip)")
    ap.add_argument("--out-dir", required=True)
    a = ap.parse_args(argv)
    drop_if = a.drop_if or ["cuda", "rocm", "xpu", "hip"]
    for w in a.wheels:
        slim(w, a.keep, drop_if, a.out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
