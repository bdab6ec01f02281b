from setuptools import setup

setup(
    name="lora-fused",
    version="0.1.0",
    description="Fused Triton kernels for LoRA: training and multi-adapter serving without forming B·A",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    # kernels/ ships as lora_fused.kernels: a top-level `kernels` module is taken on PyPI.
    packages=["lora_fused", "lora_fused.dispatch", "lora_fused.backends", "lora_fused.ops", "lora_fused.serving",
              "lora_fused.modules", "lora_fused.adapters", "lora_fused.integrations", "lora_fused.kernels"],
    package_dir={"lora_fused": "lora_fused", "lora_fused.kernels": "kernels"},
    package_data={"lora_fused": ["data/*.txt"]},  # the demo's corpus
    install_requires=[
        "torch>=2.5",
        "triton>=3.1; platform_system == 'Linux'",
        "numpy",
        "safetensors>=0.4",
    ],
    # Opt-in engine plugins: each acts only when its variable is set (LORA_FUSED_VLLM=1,
    # LORA_FUSED_SGLANG=1), so installing lora-fused never changes what an engine does on its own.
    entry_points={
        "vllm.general_plugins": ["lora_fused = lora_fused.integrations.vllm:load_plugin"],
        "sglang.srt.plugins": ["lora_fused = lora_fused.integrations.sglang:load_plugin"],
    },
    extras_require={
        "test": ["pytest>=7", "pytest-xdist>=3", "hypothesis>=6", "peft>=0.14", "transformers>=4.45",
                 "bitsandbytes>=0.45"],
        "qlora": ["bitsandbytes>=0.45"],  # 4-bit (QLoRA) base layers: lora_fused/modules/qlora.py
        "bench": ["pytest-benchmark>=4", "matplotlib>=3.5", "tqdm>=4"],
    },
)
