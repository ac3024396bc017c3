"""The CUDA sources of the extension compile, without a GPU.

* every csrc/*.cu compiles with nvcc for Hopper (sm_90) and includes no torch header (the
  kernels must build against the CUDA runtime alone; see csrc/README.md);
* csrc/ops_cuda.cpp, the torch binding, passes a syntax check against the installed torch.
  A CPU build of torch ships c10/cuda headers that cannot be used without a CUDA build
  (they need a generated cuda_cmake_macros.h and the CUDA math libraries' headers), so there
  the check runs against declaration-only stand-ins in tests/ext_cuda_shim/; with a CUDA
  build of torch it runs against the real headers.
"""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import torch.utils.cpp_extension

CSRC = Path(__file__).resolve().parents[1] / "csrc"
SHIM = Path(__file__).resolve().parent / "ext_cuda_shim"
CU_FILES = sorted(CSRC.glob("*.cu"))
TORCH_FREE = CU_FILES + sorted(CSRC.glob("*.cuh")) + [CSRC / "cuda_launchers.h"]
INCLUDE = re.compile(r'^\s*#\s*include\s*[<"]([^>"]+)[>"]', re.MULTILINE)


def find_nvcc():
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.environ.get("CUDA_HOME"):
        candidate = Path(os.environ["CUDA_HOME"]) / "bin" / "nvcc"
        nvcc = str(candidate) if candidate.is_file() else None
    if nvcc is None:
        pytest.skip("nvcc is needed to compile the CUDA sources (not on PATH, nor in $CUDA_HOME/bin)")
    return nvcc


def cuda_include_dir(nvcc):
    """The directory holding cuda_runtime.h: next to nvcc, else where nvcc itself looks
    (nvcc may be a wrapper script outside the toolkit)."""
    roots = [Path(nvcc).resolve().parent.parent]
    roots += [Path(os.environ[v]) for v in ("CUDA_HOME", "CUDA_PATH") if os.environ.get(v)]
    for root in roots:
        for candidate in (root / "include", root / "targets" / "x86_64-linux" / "include",
                          root / "targets" / "sbsa-linux" / "include"):
            if (candidate / "cuda_runtime.h").is_file():
                return candidate
    done = subprocess.run([nvcc, "--dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
                          capture_output=True, text=True, timeout=120)
    for flag in re.findall(r'-I"?([^"\s]+)', done.stdout + done.stderr):
        if (Path(flag) / "cuda_runtime.h").is_file():
            return Path(flag)
    pytest.fail(f"cuda_runtime.h not found next to {nvcc}, in $CUDA_HOME, or in nvcc's include path")


def test_sources_exist():
    assert CU_FILES, f"no .cu files in {CSRC}"
    assert (CSRC / "ops_cuda.cpp").is_file()
    assert (CSRC / "cuda_launchers.h").is_file()


@pytest.mark.parametrize("path", TORCH_FREE, ids=lambda p: p.name)
def test_kernel_sources_include_no_torch_header(path):
    includes = INCLUDE.findall(path.read_text())
    torch_headers = [h for h in includes if h.split("/")[0] in ("torch", "ATen", "c10", "caffe2")]
    assert not torch_headers, f"{path.name} includes torch headers: {torch_headers}"


@pytest.fixture(scope="module")
def cu_objects(tmp_path_factory):
    """Every .cu compiled once for sm_90 (concurrently): {file name: (return code, stderr, object)}."""
    nvcc = find_nvcc()
    flags = torch.utils.cpp_extension.COMMON_NVCC_FLAGS
    out = tmp_path_factory.mktemp("cu")
    running = {}
    for path in CU_FILES:
        obj = out / f"{path.stem}.o"
        running[path.name] = (subprocess.Popen(
            [nvcc, "-std=c++17", "-arch=sm_90", "-O2", *flags, "-c", str(path), "-o", str(obj)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), obj)
    results = {}
    for name, (proc, obj) in running.items():
        _, stderr = proc.communicate(timeout=900)
        results[name] = (proc.returncode, stderr, obj)
    return results


@pytest.mark.parametrize("path", CU_FILES, ids=lambda p: p.name)
def test_cu_compiles_for_sm90(path, cu_objects):
    """With the flags torch's extension builder adds (no implicit half/bf16 conversions)."""
    returncode, stderr, _ = cu_objects[path.name]
    assert returncode == 0, f"nvcc failed on {path.name}:\n{stderr[-6000:]}"


def test_the_builder_compiles_every_source_here():
    """ext.py's source lists name exactly the .cpp and .cu files of csrc/ (a kernel file left out
    of them would build, and fail to load for its missing symbols, only on a GPU machine)."""
    from coatnet_fast import ext

    assert set(ext.CUDA_SOURCES) == {p.name for p in CU_FILES} | {"ops_cuda.cpp"}
    assert set(ext.CPU_SOURCES) == {p.name for p in CSRC.glob("*.cpp")} - {"ops_cuda.cpp"}
    assert "batch_norm_act_cuda.cu" in ext.CUDA_SOURCES and "batch_norm_act_cpu.cpp" in ext.CPU_SOURCES


def test_every_declared_launcher_is_defined_with_its_signature(cu_objects, tmp_path):
    """Each launcher cuda_launchers.h declares (what ops_cuda.cpp calls) is defined in a .cu
    object under the same mangled name, so with the same parameter types: a mismatch would
    otherwise surface as an undefined symbol when the library loads on a GPU."""
    nvcc = find_nvcc()
    nm = shutil.which("nm")
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    assert nm and compiler, "nm and a C++ compiler are needed"
    assert all(code == 0 for code, _, _ in cu_objects.values()), "a .cu file does not compile (see above)"
    header = (CSRC / "cuda_launchers.h").read_text()
    names = re.findall(r"^(?:cudaError_t|size_t)\s+(\w+)\(", header, re.MULTILINE)
    assert "batch_norm_act_backward_launch" in names and "dwconv_bn_stats_launch" in names, names
    user = tmp_path / "uses_launchers.cpp"
    user.write_text('#include "cuda_launchers.h"\n' + "".join(
        f"void* use_{name} = reinterpret_cast<void*>(&coatnet_fast_cuda::{name});\n" for name in names))
    done = subprocess.run([compiler, "-std=c++17", f"-I{CSRC}", f"-I{cuda_include_dir(nvcc)}", "-c", str(user), "-o",
                           str(tmp_path / "uses.o")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    needed = set(subprocess.run([nm, "--undefined-only", "--format=just-symbols", str(tmp_path / "uses.o")],
                                capture_output=True, text=True, check=True).stdout.split())
    needed = {s for s in needed if "coatnet_fast_cuda" in s}
    assert len(needed) == len(names), (needed, names)
    defined = set()
    for _, _, obj in cu_objects.values():
        defined |= set(subprocess.run([nm, "--defined-only", "--format=just-symbols", str(obj)],
                                      capture_output=True, text=True, check=True).stdout.split())
    missing = subprocess.run(["c++filt"], input="\n".join(sorted(needed - defined)), capture_output=True,
                             text=True).stdout if needed - defined else ""
    assert needed <= defined, f"declared in cuda_launchers.h but not defined in any .cu:\n{missing}"


def test_ops_cuda_cpp_syntax():
    nvcc = find_nvcc()
    compiler = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    assert compiler, "no C++ compiler (c++ / g++ / $CXX) found"
    torch_includes = torch.utils.cpp_extension.include_paths()
    has_real_cuda_headers = torch.version.cuda is not None and any(
        (Path(p) / "ATen" / "cuda" / "CUDAContext.h").is_file() for p in torch_includes)
    includes = [] if has_real_cuda_headers else [str(SHIM)]  # first, so it wins over torch's
    includes += torch_includes + [str(cuda_include_dir(nvcc))]
    if has_real_cuda_headers:
        # A CUDA build of torch from PyPI brings the CUDA libraries' headers (cusparse.h, which
        # CUDAContext.h includes, among them) as pip packages, where a toolkit with nvcc alone
        # may lack them.
        site = Path(torch.__file__).resolve().parent.parent / "nvidia"
        includes += [str(p) for p in sorted(site.glob("*/include")) if p.is_dir()]
    done = subprocess.run(
        [compiler, "-std=c++17", "-fsyntax-only", *[f"-I{p}" for p in includes],
         str(CSRC / "ops_cuda.cpp")],
        capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, f"ops_cuda.cpp does not compile:\n{done.stderr[-6000:]}"


def _schemas():
    """{op name: (argument types, number of returns)} from the m.def calls of csrc/ops.cpp."""
    text = (CSRC / "ops.cpp").read_text()
    schemas = {}
    for call in re.findall(r"m\.def\((.*?)\);", text, re.DOTALL):
        schema = "".join(re.findall(r'"([^"]*)"', call))
        name, args, returns = re.fullmatch(r"\s*(\w+)\((.*?)\)\s*->\s*(.*?)\s*", schema).groups()
        arg_types = tuple(a.strip().rsplit(" ", 1)[0] for a in args.split(",") if a.strip())
        schemas[name] = (arg_types, returns.count("Tensor"))
    return schemas


def _impls(text, key):
    """{op name: C++ function} registered in the file's TORCH_LIBRARY_IMPL(..., key, m) block."""
    block = re.search(r"TORCH_LIBRARY_IMPL\(\s*coatnet_fast_ext\s*,\s*%s\s*,\s*m\s*\)\s*\{(.*?)\n\}" % key,
                      text, re.DOTALL)
    assert block, f"no TORCH_LIBRARY_IMPL(coatnet_fast_ext, {key}, m) block"
    return dict(re.findall(r'm\.impl\(\s*"(\w+)"\s*,\s*&?([\w:]+)\s*\)', block.group(1)))


CPP_TYPES = {"constat::Tensor&": "Tensor", "conststd::optional<at::Tensor>&": "Tensor?",
             "int64_t": "int", "double": "float", "bool": "bool"}


def test_cuda_binding_matches_the_schemas():
    """ops_cuda.cpp gives a CUDA kernel to every op that has a CPU kernel, under the names and
    with the argument types of the schemas in ops.cpp: a mismatch would otherwise surface only
    when the library loads on a GPU machine."""
    schemas = _schemas()
    cuda_text = (CSRC / "ops_cuda.cpp").read_text()
    cuda = _impls(cuda_text, "CUDA")
    cpu = _impls((CSRC / "ops.cpp").read_text(), "CPU")
    assert set(cuda) == set(cpu), f"CUDA registers {sorted(cuda)}, CPU registers {sorted(cpu)}"
    for op, func in cuda.items():
        assert op in schemas, f"{op} is registered for CUDA but not defined in ops.cpp"
        match = re.search(r"(std::tuple<[^;{]*?>|at::Tensor)\s+%s\(([^)]*)\)\s*\{" % re.escape(func),
                          cuda_text, re.DOTALL)
        assert match, f"definition of {func} not found in ops_cuda.cpp"
        returns = match.group(1).count("at::Tensor")
        params = [p.strip() for p in match.group(2).split(",")]
        types = tuple(CPP_TYPES.get("".join(p.rsplit(None, 1)[0].split()), p) for p in params)
        assert (types, returns) == schemas[op], f"{func}{types} -> {returns} vs schema {op}{schemas[op]}"
