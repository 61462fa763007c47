"""Build torch_ntk and its native core ``torch_ntk._C``."""
from setuptools import find_packages, setup

setup(
    name="torch_ntk",
    version="0.1.0",
    description="Exact neural tangent kernels for PyTorch models",
    packages=find_packages(include=["torch_ntk", "torch_ntk.*"]),
    python_requires=">=3.9",
    install_requires=["torch", "numpy", "tqdm", "matplotlib"],
    extras_require={"test": ["pytest", "scipy"]},
)
