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
        "megatron-core==0.16.1",  # the hook points are pinned (shared/MEGATRON_NOTES.md)
        "torch>=2.6",
        "numpy",
        "packaging",
        "PyYAML",
    ],
    entry_points={"console_scripts": ["megatron-tsp=megatron_tsp.cli:main"]},
    package_data={},
    extras_require={
        # psutil: megatron-core's distributed checkpointing imports it without declaring it
        "test": ["pytest", "psutil"],
    },
)
