"""The wheel: kernels/ inside the package, csrc/ as package data, no top-level 'kernels'."""
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, cwd=tmp_path,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (wheel,) = tmp_path.glob("coatnet_fast-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert "kernels" not in tops and "csrc" not in tops and "tests" not in tops, tops
    assert "coatnet_fast/kernels/__init__.py" in names
    assert "coatnet_fast/csrc/README.md" in names
    for source in (ROOT / "csrc").iterdir():
        if source.suffix in {".cpp", ".cu", ".cuh", ".h"}:
            assert f"coatnet_fast/csrc/{source.name}" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "coatnet-fast = coatnet_fast.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def test_checkout_serves_kernels_under_the_package_name():
    import coatnet_fast._paths as paths
    import coatnet_fast.kernels

    assert Path(coatnet_fast.kernels.__file__).parent.name == "kernels"
    assert (paths.csrc_dir() / "README.md").is_file()
