"""The benchmark scripts run (at a smoke size) and write what they promise; no timing is asserted."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import bench_model  # noqa: E402


def test_bench_model_smoke(tmp_path):
    out = tmp_path / "model.json"
    assert bench_model.main(["--smoke", "--providers", "eager", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["env"]["torch"] and payload["env"]["device"] and payload["env"]["commit"]
    modes = {(r["provider"], r["mode"]) for r in payload["results"]}
    assert modes == {("eager", "train"), ("eager", "infer")}
    assert all(r["images_per_s"] > 0 and r["speedup_vs_eager"] == 1.0 for r in payload["results"])
