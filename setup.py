"""Installs the minird package. The C++/CUDA extension minird._C is added in the kernels work."""
from setuptools import find_packages, setup

setup(
    name="minird",
    version="0.1.0",
    description="A minimal recurrent-depth (latent reasoning) language model",
    packages=find_packages(include=["minird", "minird.*"]),
    python_requires=">=3.10",
    install_requires=["torch", "tqdm"],
    extras_require={"plot": ["matplotlib"], "test": ["pytest"]},
)
