"""Packaging of p2pkv (see README.md)."""

from pathlib import Path

from setuptools import find_packages, setup

GPU_COMMON = ["cupy-cuda{cu}x>=13", "nvidia-nccl-cu{cu}>=2.20", "nccl4py>=0.6"]


def gpu_extra(cu: str) -> list[str]:
    return [d.format(cu=cu) for d in GPU_COMMON]


setup(
    name="p2pkv",
    version="0.1.0",
    description="KV-cache transfer engine for disaggregated LLM serving (NCCL, CUDA IPC, TCP)",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["p2pkv", "p2pkv.*"]) + ["p2pkv.csrc"],
    package_dir={"p2pkv.csrc": "csrc"},
    package_data={"p2pkv.csrc": ["*.cu", "*.cuh"]},
    include_package_data=True,
    # tqdm: the demo's and the benchmark's progress bar; pure Python, no dependencies, and already
    # installed wherever vLLM or SGLang is (both require it), so it costs p2pkv's users nothing.
    install_requires=["torch>=2.1", "numpy>=1.24", "pyzmq>=25", "msgpack>=1.0", "tqdm>=4.60"],
    extras_require={
        "cu12": gpu_extra("12"),
        "cu13": gpu_extra("13"),
        "test": ["pytest>=7", "pytest-timeout>=2.1", "hypothesis>=6.80", "aiohttp>=3.9"],
        # CI's gates (settings in pyproject.toml); pinned so a new release cannot fail an unchanged tree.
        "lint": ["ruff==0.17.6", "mypy==2.4.1"],
        "bench": ["matplotlib>=3.6"],
        "proxy": ["aiohttp>=3.9"],
    },
    entry_points={"console_scripts": ["p2pkv-demo=p2pkv.demo:main", "p2pkv-bench=p2pkv.bench:main",
                                      "p2pkv-proxy=p2pkv.proxy:main"],
                  # SGLang (>= 0.5.23) loads this group in every process it starts: registers the "p2pkv"
                  # transfer backend, so `sglang.launch_server --disaggregation-transfer-backend p2pkv` works.
                  "sglang.srt.plugins": ["p2pkv=p2pkv.adapters.sglang:plugin"]},
    classifiers=[
        "Programming Language :: Python :: 3",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
