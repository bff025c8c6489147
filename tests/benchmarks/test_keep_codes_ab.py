"""benchmarks/diag/keep_codes_ab.py's harness on the CPU (tiny model): the runs alternate keep codes on and off,
the results carry what a GPU run records, and the library's KEEP_CODES is restored afterwards."""
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_keep_codes_ab_harness_on_cpu(tmp_path, monkeypatch):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks", "diag"))
    try:
        import keep_codes_ab
    finally:
        sys.path.pop(0)
    import llama.fast_path as fp

    seen = []
    real = keep_codes_ab.e2e.run_stack

    def spy(*a, **k):
        seen.append(fp.KEEP_CODES)
        return real(*a, **k)
    monkeypatch.setattr(keep_codes_ab.e2e, "run_stack", spy)
    out = tmp_path / "ab.json"
    monkeypatch.setattr(sys, "argv", ["keep_codes_ab.py", "--size", "tiny", "--device", "cpu", "--steps", "4",
                                      "--rounds", "2", "--mode", "always", "--out", str(out)])
    keep_codes_ab.main()
    r = json.loads(out.read_text())
    assert seen == ["always", "never", "always", "never"]
    assert [x["keep_codes"] for x in r["runs"]] == [True, False, True, False]
    assert {"gpu", "date", "commit", "best_step_ms", "speedup"} <= r.keys()
    assert r["speedup"] == round(r["best_step_ms"]["regenerate"] / r["best_step_ms"]["keep_codes"], 4)
    assert all(len(x["losses"]) == 4 for x in r["runs"])
    assert fp.KEEP_CODES == "recompute"
