"""coatnet-fast info / verify / list, as a user runs them."""
import os
import shutil
import subprocess
import sys

import pytest

from coatnet_fast import cli
from coatnet_fast.ops import dispatch
from coatnet_fast.ops.rel_bias_attention import rel_bias_attention_eager


def run_cli(*args):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "coatnet_fast", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_info_lists_every_backend_of_every_op():
    done = run_cli("info")
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "torch" in out and "device:" in out
    for op in dispatch.ops():
        for backend in dispatch.BACKENDS:
            usable = "no" if dispatch.why_not(op, backend) else "yes"
            assert any(line.split()[:3] == [op, backend, usable] for line in out.splitlines()), (op, backend)


def test_verify_passes_and_reports_a_table():
    done = run_cli("verify")
    assert done.returncode == 0, done.stdout + done.stderr
    for check in ("rel_bias_attention", "dwconv_bn_gelu", "batch_norm_act", "max_pool2d", "model"):
        assert check in done.stdout
    assert "MISMATCH" not in done.stdout and " 0 failed" in done.stdout


def test_verify_fails_on_a_wrong_backend(monkeypatch, capsys):
    def off_by_a_bit(q, k, v, table, window, scale):
        return rel_bias_attention_eager(q, k, v, table, window, scale) * 1.01

    saved = dict(dispatch._TABLE["rel_bias_attention"])
    try:
        dispatch.register("rel_bias_attention", "triton", off_by_a_bit)
        code = cli.main(["verify", "--backend", "triton", "--device", "cpu"])
    finally:
        dispatch._TABLE["rel_bias_attention"] = saved
    out = capsys.readouterr().out
    assert code == 1
    assert "MISMATCH" in out


def test_list_prints_the_family():
    done = run_cli("list", "--image-size", "64")
    assert done.returncode == 0, done.stderr
    for name in ("seed", "coatnet_0", "coatnet_4"):
        assert name in done.stdout


def test_bad_arguments_exit_nonzero():
    assert run_cli("verify", "--dtype", "int8").returncode != 0
    assert run_cli("frobnicate").returncode != 0


def test_console_script_is_installed():
    exe = shutil.which("coatnet-fast")
    if exe is None:
        pytest.fail("coatnet-fast is not on PATH: install the package (pip install -e '.[test]') before testing")
    done = subprocess.run([exe, "info"], capture_output=True, text=True)
    assert done.returncode == 0 and "backends" in done.stdout
