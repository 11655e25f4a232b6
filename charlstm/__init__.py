"""charlstm: character-level LSTM language models on the CPU, hot loops compiled with Numba."""
import os

__version__ = "0.1.0"


def _choose_blas_kernels():
    """Pick OpenBLAS's AVX-512 (SkylakeX) kernels on AMD CPUs with AVX-512, before OpenBLAS loads.

    SciPy's OpenBLAS (0.3.30) does not recognise AMD Zen 4/5 and falls back to its Haswell (AVX2)
    kernels, and some environments pin OPENBLAS_CORETYPE=Haswell; on Zen 5 (full-width AVX-512)
    the SkylakeX kernels run every product about twice as fast. CHARLSTM_BLAS_CORETYPE overrides:
    `keep` leaves OPENBLAS_CORETYPE as the environment has it, any other value is used as the
    core type. Linux only (reads /proc/cpuinfo); elsewhere nothing changes.
    """
    choice = os.environ.get("CHARLSTM_BLAS_CORETYPE", "auto")
    if choice == "keep":
        return
    if choice != "auto":
        os.environ["OPENBLAS_CORETYPE"] = choice
        return
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read(1 << 16)
    except OSError:
        return
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    if "AuthenticAMD" in info and {"avx512f", "avx512dq", "avx512cd", "avx512bw", "avx512vl"} <= set(flags):
        os.environ["OPENBLAS_CORETYPE"] = "SkylakeX"


_choose_blas_kernels()

