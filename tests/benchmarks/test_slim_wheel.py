"""benchmarks/slim_wheel.py: the copy of a wheel keeps what the device loads and a RECORD of exactly that."""
import zipfile

import pytest

from benchmarks import slim_wheel


def _wheel(path):
    files = {"pkg/__init__.py": b"x = 1\n", "pkg/libpkg_cpu.so": b"\x7fELFcpu", "pkg/libpkg_cuda130.so": b"\x7fELF130",
             "pkg/libpkg_cuda128.so": b"\x7fELF128", "pkg/libpkg_rocm72.so": b"\x7fELFrocm",
             "pkg-1.0.dist-info/METADATA": b"Name: pkg\n"}
    with zipfile.ZipFile(path, "w") as z:
        for n, d in files.items():
            z.writestr(n, d)
        z.writestr("pkg-1.0.dist-info/RECORD", "\n".join(f"{n},," for n in files) + "\n")
    return files


def test_slim_keeps_the_chosen_library_and_rewrites_record(tmp_path):
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    files = _wheel(src)
    out = slim_wheel.slim(str(src), ["cuda130"], ["cuda", "rocm"], str(tmp_path / "slim"))
    with zipfile.ZipFile(out) as z:
        names = set(z.namelist())
        assert names == {"pkg/__init__.py", "pkg/libpkg_cpu.so", "pkg/libpkg_cuda130.so",
                         "pkg-1.0.dist-info/METADATA", "pkg-1.0.dist-info/RECORD"}
        for n in names - {"pkg-1.0.dist-info/RECORD"}:
            assert z.read(n) == files[n]
        record = z.read("pkg-1.0.dist-info/RECORD").decode().splitlines()
    assert {line.split(",")[0] for line in record} == names
    assert all(line.split(",")[1].startswith("sha256=") for line in record if "RECORD" not in line)
    assert not list((tmp_path / "slim").glob("*.part"))


def test_slim_refuses_bad_input(tmp_path):
    (tmp_path / "x.whl").write_text("not a zip")
    with pytest.raises(SystemExit, match="not a wheel"):
        slim_wheel.slim(str(tmp_path / "x.whl"), [], ["cuda"], str(tmp_path / "out"))
    src = tmp_path / "pkg-1.0-py3-none-any.whl"
    _wheel(src)
    with pytest.raises(SystemExit, match="overwrite"):
        slim_wheel.slim(str(src), [], ["cuda"], str(tmp_path))
