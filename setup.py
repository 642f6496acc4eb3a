"""Installs minird and, where a compiler is there, its C++/CUDA extension minird._C.

    pip install --no-build-isolation -e .            # CPU kernels, or CPU + CUDA where torch has CUDA
    FORCE_CUDA=1 ...                                 # build the CUDA kernels even with no GPU visible
    TORCH_CUDA_ARCH_LIST=9.0 ...                     # which GPUs to build for (torch's variable)
    DEBUG=1 ...                                      # -O0 -g, for a debugger
    MAX_JOBS=1 ...                                   # ninja's parallelism (torch's variable)

The extension is optional: when torch is missing at build time, or the build fails (no compiler,
no CUDA toolkit), the package still installs and runs on the pure-PyTorch path; minird.ops then
prints a one-line warning. --no-build-isolation lets the build see the installed torch.
"""
import glob
import os
import sys

from setuptools import find_packages, setup


def extension_and_cmdclass():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("minird: torch not importable at build time; installing without the C++/CUDA extension")
        return [], {}

    debug = os.getenv("DEBUG", "0") == "1"
    use_cuda = (torch.version.cuda is not None or os.getenv("FORCE_CUDA", "0") == "1") and CUDA_HOME is not None
    sources = sorted(glob.glob("csrc/*.cpp"))
    extra = {"cxx": ["-O0", "-g"] if debug else ["-O3"]}
    # at::parallel_for is a header template: compiled without OpenMP it runs every CPU kernel on one
    # thread, whatever torch.set_num_threads says. Only the compile gets -fopenmp; the GOMP symbols
    # then bind at load time to the OpenMP runtime torch itself loaded, so that the two share one
    # thread pool and one thread count (linking a second libgomp would give the kernels their own).
    if torch.backends.openmp.is_available() and sys.platform.startswith("linux"):
        extra["cxx"].append("-fopenmp")
    if use_cuda:
        sources += sorted(glob.glob("csrc/cuda/*.cu"))
        extra["nvcc"] = ["-O0", "-g", "-G"] if debug else ["-O3"]
    Extension = CUDAExtension if use_cuda else CppExtension
    ext = Extension("minird._C", sources, extra_compile_args=extra, extra_link_args=["-g"] if debug else [])

    class OptionalBuildExtension(BuildExtension.with_options(use_ninja=True)):
        """A failed build leaves the pure-PyTorch package installed instead of failing the install."""

        def run(self):
            try:
                super().run()
            except Exception as exc:  # compiler missing, CUDA toolkit mismatch, compile error, ...
                print(f"minird: building the C++/CUDA extension failed ({exc}); "
                      "installing the pure-PyTorch path only")

    return [ext], {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = extension_and_cmdclass()

setup(
    name="minird",
    version="0.1.0",
    description="A minimal recurrent-depth (latent reasoning) language model",
    packages=find_packages(include=["minird", "minird.*"]),
    python_requires=">=3.10",
    # numpy: torch warns "Failed to initialize NumPy" on every import without it
    install_requires=["torch", "numpy", "tqdm", "safetensors", "tokenizers"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest"], "hf": ["huggingface_hub"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
