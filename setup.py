from pathlib import Path

from setuptools import find_packages, setup

requirements = [
    line.split("#")[0].strip()
    for line in Path(__file__).with_name("requirements.txt").read_text().splitlines()
    if line.split("#")[0].strip() and not line.startswith("pytest")
]

setup(
    name="glm_training",
    version="0.1.0",
    description="YAML-driven fine-tuning (SFT, DPO, GRPO) for GLM-Image, SDXL, FLUX.1 Kontext, "
                "Qwen-Image and BAGEL",
    long_description=Path(__file__).with_name("README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["glm_training", "glm_training.*"]),
    # The real architectures' config.json files (no weights) the memory planner builds on the meta device.
    package_data={"glm_training": ["models/architectures/**/*.json"]},
    install_requires=requirements,
    extras_require={"optim": ["bitsandbytes", "prodigyopt"], "ocr": ["paddleocr"],
                    "eval": ["torch-fidelity==0.4.0"],  # Inception for FID/KID
                    "quant": ["bitsandbytes==0.50.2"],  # model.quantize nf4 (CUDA only)
                    "qlora": ["bitsandbytes==0.50.2"],  # prompt_policy.train_type: qlora (4-bit policy base, CUDA)
                    "deepspeed": ["deepspeed==0.19.8"]},  # distributed.deepspeed / --deepspeed / deepspeed_zero*.yaml
    py_modules=["train", "train_ar", "train_dit"],
    entry_points={"console_scripts": ["glm-train=glm_training.cli:main",
                                     "glm-predict=glm_training.predict:main"]},
)
