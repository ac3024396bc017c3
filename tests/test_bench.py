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


def test_bench_dwconv_bn_gelu_smoke(tmp_path):
    import bench_dwconv_bn_gelu

    out = tmp_path / "dw.json"
    assert bench_dwconv_bn_gelu.main(["--smoke", "--modes", "eval", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["provider"] for r in rows} >= {"eager"}
    assert all(r["correct"] for r in rows if "correct" in r)


def test_bench_rel_bias_attention_smoke(tmp_path):
    import bench_rel_bias_attention

    out = tmp_path / "attn.json"
    assert bench_rel_bias_attention.main(["--smoke", "--providers", "eager,sdpa", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["results"]
    assert {r["provider"] for r in rows} == {"eager", "sdpa"} and all(r["correct"] for r in rows)
