"""Each benchmark runs end to end in its seconds-long smoke mode, so `bench/` cannot rot. No timing asserts."""

import json
import subprocess
import sys

from conftest import ROOT


def test_bench_data_quick(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench", "data", "--quick", "--out", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    head = json.loads(r.stdout.strip().splitlines()[-1])
    assert head["vlmtrain_samples_per_s"] > 0 and head["peer_samples_per_s"] > 0
    assert abs(head["ratio"] - head["vlmtrain_samples_per_s"] / head["peer_samples_per_s"]) < 1e-9
    full = json.loads((tmp_path / "d.json").read_text())
    assert full["records"] == 200 and full["machine"]["cpu_count"]
