from setuptools import find_packages, setup

setup(
    name="codir-ds",
    version="0.1.0",
    description="Contrastive distillation (CoDIR, CR-ILD, CTCD) of transformer language models on DeepSpeed",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["codir_ds", "codir_ds.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "deepspeed>=0.15",
        "transformers>=4.46",
        "datasets>=2.19",
        "tensorboard>=2.14",
        "pyyaml>=6.0",
        "safetensors>=0.4",
        "tqdm>=4.66",
        "numpy>=1.24",
        "scipy>=1.10",
    ],
    extras_require={
        "test": ["pytest>=8", "pytest-timeout>=2.3"],
        "bench": ["matplotlib>=3.7"],  # bench/compare.py's bar charts
        # launchers/export.py --onnx (torch.onnx's exporter, ONNX Runtime's check and int8 quantization) and
        # ONNX models in launchers/evaluate.py
        "deploy": ["onnx>=1.16", "onnxruntime>=1.18", "onnxscript>=0.3"],
        # NVIDIA apex is not on PyPI: install it from source yourself if you want its fused kernels.
    },
)
