"""The benchmark runs end to end (small CPU shapes) and writes the documented JSON schema."""
import json

from hires_lmm.bench.__main__ import main


def test_bench_deepstack_json_and_plot(tmp_path):
    out, png = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["--device", "cpu", "--quick", "--only", "deepstack", "--iters", "3",
               "--json", str(out), "--plot", str(png)])
    assert rc == 0
    r = json.loads(out.read_text())
    for key in ("gpu", "commit", "date", "torch", "cuda", "records"):
        assert key in r
    ops = {x["op"] for x in r["records"]}
    assert {"deepstack_inject", "deepstack_inject_rms_norm", "deepstack_inject_layer_norm"} <= ops
    for x in r["records"]:
        for key in ("op", "case", "dtype", "ours_us", "reference", "reference_us", "speedup", "max_err", "ok"):
            assert key in x
        assert x["ours_us"] > 0 and x["ok"] is True
        assert "gbps" in x or "tflops" in x
    assert png.stat().st_size > 1000


def test_sanitize_smoke_plumbing_on_cpu():
    """bench/sanitize_smoke.py (run under compute-sanitizer by gpu_validate.sh) stays runnable."""
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    r = subprocess.run([sys.executable, os.path.join(root, "bench", "sanitize_smoke.py")],
                       env={**os.environ, "HIRES_LMM_SMOKE_DEVICE": "cpu"}, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "0 mismatches" in r.stdout
