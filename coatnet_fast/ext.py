"""The optional C++/CUDA extension behind the ``"ext"`` backend: built on first use, cached.

The sources in ``csrc/`` are compiled by ``torch.utils.cpp_extension.load`` with ninja into a
per-user cache, in a directory named by a hash of the sources, the torch and CUDA versions,
the Python version and the compiler flags, so a changed source or a new torch builds afresh
and an unchanged one loads in milliseconds. The library registers its ops with TORCH_LIBRARY
under ``torch.ops.coatnet_fast_ext``; the op modules add their autograd formulas and fake
kernels from Python once it is loaded (``on_load``).

Importing this module compiles nothing and does not initialise CUDA. ``coatnet-fast build-ext``
builds ahead of time; ``coatnet-fast info`` reports ``status()``.

Environment:
    COATNET_FAST_EXT_DIR: cache root (default ``$XDG_CACHE_HOME/coatnet_fast/ext``, else
        ``~/.cache/coatnet_fast/ext``).
    COATNET_FAST_EXT_CUDA=0: build the CPU part only, even when torch has CUDA.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from ._paths import csrc_dir

NAMESPACE = "coatnet_fast_ext"
CPU_SOURCES = ("ops.cpp", "rel_bias_attention_cpu.cpp", "dwconv_bn_gelu_cpu.cpp", "batch_norm_act_cpu.cpp")
CUDA_SOURCES = ("ops_cuda.cpp", "rel_bias_attention_cuda.cu", "dwconv_bn_gelu_cuda.cu", "batch_norm_act_cuda.cu")
_SOURCE_SUFFIXES = (".cpp", ".cu", ".cuh", ".h")


class ExtensionUnavailableError(RuntimeError):
    """The extension cannot be built or loaded here; the message says why."""


_lock = threading.RLock()
_loaded_path: Optional[Path] = None
_build_failure: Optional[str] = None
_on_load: List[Callable[[], None]] = []
# unavailable_reason()'s answer before the first load, remembered: the dispatcher asks on
# every call, and hashing the sources or asking ninja each time would cost milliseconds.
_verdict: Optional[List[Optional[str]]] = None


def cache_root() -> Path:
    if os.environ.get("COATNET_FAST_EXT_DIR"):
        return Path(os.environ["COATNET_FAST_EXT_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "coatnet_fast" / "ext"


def cpu_flags() -> List[str]:
    """Compiler flags for the CPU kernels.

    ATen's vector types pick their instruction set from CPU_CAPABILITY macros (ATen's own
    build compiles each kernel once per capability); the extension is built for the machine
    it runs on, so it takes AVX2 where the CPU has it (AVX-512 machines included) and the
    portable scalar fallback elsewhere. OpenMP backs at::parallel_for, which is inline in
    ATen's headers.
    """
    flags = ["-O3", "-fopenmp"]
    if platform.machine().lower() in ("x86_64", "amd64") and torch.backends.cpu.get_cpu_capability() in (
        "AVX2",
        "AVX512",
    ):
        return flags + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma", "-mf16c"]
    return flags + ["-DCPU_CAPABILITY=DEFAULT"]


def cuda_flags() -> List[str]:
    return ["-O3", "-std=c++17"]


# Looked up once (the dispatcher asks on every call, and torch.compile traces the answer).
_cuda_reason: Optional[List[Optional[str]]] = None


def cuda_unavailable_reason() -> Optional[str]:
    """None when the build includes the CUDA kernels, else why it does not."""
    global _cuda_reason
    if _cuda_reason is None:
        _cuda_reason = [_find_cuda_reason()]
    return _cuda_reason[0]


def _find_cuda_reason() -> Optional[str]:
    if os.environ.get("COATNET_FAST_EXT_CUDA") == "0":
        return "COATNET_FAST_EXT_CUDA=0 asks for a CPU-only build"
    if torch.version.cuda is None:
        return f"this torch ({torch.__version__}) is built without CUDA"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None:
        return "nvcc was not found (set CUDA_HOME)"
    # cpp_extension runs $CUDA_HOME/bin/nvcc, and CUDA_HOME may be a runtime-only /usr/local/cuda.
    nvcc = Path(CUDA_HOME) / "bin" / ("nvcc.exe" if os.name == "nt" else "nvcc")
    if not nvcc.is_file():
        return f"nvcc was not found at {nvcc} (set CUDA_HOME)"
    # Without an arch list, cpp_extension builds for the visible GPUs and fails when there are none.
    if os.environ.get("TORCH_CUDA_ARCH_LIST", "") in ("", "native") and torch.cuda.device_count() == 0:
        return "no GPU is visible and TORCH_CUDA_ARCH_LIST is not set (set it to build the CUDA kernels)"
    missing = [s for s in CUDA_SOURCES if not (csrc_dir() / s).is_file()]
    if missing:
        return f"CUDA sources missing from {csrc_dir()}: {', '.join(missing)}"
    return None


def with_cuda() -> bool:
    """Build the CUDA kernels too: torch has CUDA and nvcc is found (CUDA_HOME)."""
    return cuda_unavailable_reason() is None


# What the kernels take; float64 is there for torch.autograd.gradcheck.
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The kernels' accumulation type ("acc" in csrc/): float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def device_reasons(t: torch.Tensor) -> List[str]:
    """The extension runs CPU tensors, and CUDA tensors when built with its CUDA kernels."""
    if t.device.type == "cpu":
        return []
    if t.device.type == "cuda":
        why = cuda_unavailable_reason()
        return [f"this build of the extension has no CUDA kernels: {why}"] if why else []
    return [f"needs CPU or CUDA tensors; got {t.device}"]


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "c++"))


def _key(cuda: bool) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in csrc_dir().iterdir() if p.suffix in _SOURCE_SUFFIXES):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    config = [torch.__version__, str(torch.version.cuda), sys.version.split()[0], platform.machine(),
              cpu_flags(), cuda, cuda_flags() if cuda else [], os.environ.get("TORCH_CUDA_ARCH_LIST", "")]
    digest.update(json.dumps(config).encode())
    return digest.hexdigest()[:16]


def _build_dir(cuda: bool) -> Path:
    return cache_root() / f"{NAMESPACE}_{_key(cuda)}"


def _library_path(build_dir: Path) -> Path:
    return build_dir / f"{build_dir.name}.so"


def _is_built(build_dir: Path) -> bool:
    # build-info.json is written after a successful build: a library still being linked by
    # another process (torchrun ranks starting together) does not count yet.
    return _library_path(build_dir).is_file() and (build_dir / "build-info.json").is_file()


def unavailable_reason() -> Optional[str]:
    """None when the extension is loaded, built, or can be built here; else why not."""
    global _verdict
    if _loaded_path is not None:
        return None
    if _build_failure is not None:
        return _build_failure
    if _verdict is None:
        _verdict = [_find_unavailable_reason()]
    return _verdict[0]


def _find_unavailable_reason() -> Optional[str]:
    missing = [s for s in CPU_SOURCES if not (csrc_dir() / s).is_file()]
    if missing:
        return f"the extension's sources are missing from {csrc_dir()}: {', '.join(missing)}"
    if _is_built(_build_dir(with_cuda())):
        return None
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "cannot build the C++ extension: ninja is not installed (pip install ninja)"
    if _compiler() is None:
        return f"cannot build the C++ extension: no C++ compiler ({os.environ.get('CXX', 'c++')}) on PATH"
    return None


def is_loaded() -> bool:
    return _loaded_path is not None


def on_load(callback: Callable[[], None]) -> None:
    """Run ``callback`` once the library is loaded (now, if it already is)."""
    with _lock:
        _on_load.append(callback)
        if _loaded_path is not None:
            callback()


def load(verbose: bool = False) -> Path:
    """Load the extension, building it first when this configuration has no build yet."""
    global _loaded_path, _build_failure
    with _lock:
        if _loaded_path is not None:
            return _loaded_path
        why = unavailable_reason()
        if why is not None:
            raise ExtensionUnavailableError(why)
        cuda = with_cuda()
        build_dir = _build_dir(cuda)
        library = _library_path(build_dir)
        if _is_built(build_dir) and not verbose:
            try:
                torch.ops.load_library(str(library))
            except Exception as e:
                _build_failure = (f"loading the cached C++ extension {library} failed: {e}; "
                                  f"delete {build_dir} to rebuild it")
                raise ExtensionUnavailableError(_build_failure) from e
        else:
            try:
                _build(build_dir, cuda, verbose)
            except Exception as e:  # a compiler error, a missing header, an unloadable library
                _build_failure = f"building the C++ extension failed: {e}"
                raise ExtensionUnavailableError(_build_failure) from e
        # The fake kernels and autograd formulas go in before is_loaded() says so: another
        # thread that sees it loaded calls the ops straight away.
        for callback in _on_load:
            callback()
        _loaded_path = library
        return library


def _build(build_dir: Path, cuda: bool, verbose: bool) -> None:
    from torch.utils.cpp_extension import load as cpp_load

    build_dir.mkdir(parents=True, exist_ok=True)
    sources = [str(csrc_dir() / s) for s in CPU_SOURCES + (CUDA_SOURCES if cuda else ())]
    cpp_load(
        name=build_dir.name,
        sources=sources,
        extra_cflags=cpu_flags(),
        extra_cuda_cflags=cuda_flags() if cuda else None,
        extra_ldflags=["-fopenmp"],
        extra_include_paths=[str(csrc_dir())],
        build_directory=str(build_dir),
        with_cuda=cuda,
        is_python_module=False,
        verbose=verbose,
    )
    (build_dir / "build-info.json").write_text(json.dumps(_build_info(cuda), indent=2) + "\n")


def _build_info(cuda: bool) -> Dict[str, object]:
    compiler = _compiler()
    version = ""
    if compiler:
        done = subprocess.run([compiler, "--version"], capture_output=True, text=True)
        version = done.stdout.splitlines()[0] if done.stdout else ""
    info: Dict[str, object] = {
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "compiler": f"{compiler} ({version})",
        "cpu_flags": cpu_flags(),
        "cuda": cuda,
        "sources": list(CPU_SOURCES + (CUDA_SOURCES if cuda else ())),
    }
    if cuda:
        from torch.utils.cpp_extension import CUDA_HOME

        info.update(cuda_version=torch.version.cuda, cuda_home=CUDA_HOME, cuda_flags=cuda_flags(),
                    cuda_arch_list=os.environ.get("TORCH_CUDA_ARCH_LIST", "the visible GPUs'"))
    return info


def status() -> Dict[str, object]:
    """What ``coatnet-fast info`` reports: built or not, where, against what; never builds."""
    cuda = with_cuda()
    # Once loaded, report that library, even if the sources have changed since.
    library = _loaded_path or _library_path(_build_dir(cuda))
    build_dir = library.parent
    result: Dict[str, object] = {
        "loaded": _loaded_path is not None,
        "built": _is_built(build_dir),
        "path": str(library),
        "cuda": cuda,
        "unavailable": unavailable_reason(),
    }
    stamp = build_dir / "build-info.json"
    if stamp.is_file():
        result["build_info"] = json.loads(stamp.read_text())
    return result


def registered_ops() -> List[str]:
    """The ops the loaded library registered, as ``namespace::name``."""
    prefix = NAMESPACE + "::"
    return sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith(prefix))


def describe_status() -> str:
    """One line for ``coatnet-fast info``."""
    s = status()
    part = "CPU+CUDA" if s["cuda"] else "CPU"
    if s["unavailable"]:
        return f"not usable: {s['unavailable']}"
    if s["loaded"]:
        return f"loaded ({part}) from {s['path']}"
    if s["built"]:
        return f"built ({part}) at {s['path']}"
    return f"not built yet ({part}); builds on first use or with `coatnet-fast build-ext` into {s['path']}"
