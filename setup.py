from setuptools import find_packages, setup

setup(
    name="megatron-tsp",
    version="0.1.0",
    description="Folded Tensor and Sequence Parallelism (TSP) for Megatron-core",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron_tsp", "megatron_tsp.*"]),
    install_requires=[
        # tested 0.16.1 <= megatron-core <= 0.19.2 (0.17+ need Python >= 3.12); a newer one
        # installs and warns once (megatron_tsp/compat.py)
        "megatron-core>=0.16.1",
        # tested: torch 2.13.0 and 2.15.0 (CI, CPU: .ci/run's TORCH_OLDEST and TORCH_NEWEST) and
        # 2.11.0 (the recorded GPU runs, docs/validation.md); older ones were never run.
        "torch>=2.11",
        "numpy",
        "packaging",
        "PyYAML",
    ],
    entry_points={"console_scripts": ["megatron-tsp=megatron_tsp.cli:main"]},
    package_data={},
    extras_require={
        # psutil: megatron-core's distributed checkpointing imports it without declaring it
        "test": ["pytest", "psutil"],
        # bench's plot (bench_<tag>.png); the tables are written without it
        "bench": ["matplotlib"],
    },
)
