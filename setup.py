from setuptools import find_packages, setup

TRACK = ["tensorboard>=2.14", "wandb>=0.17"]

setup(
    name="lvlm_region",
    version="0.1.0",
    description="Two-stage LLaVA-style training that tunes a sparse, uniform region of the LLM's layers",
    packages=find_packages(include=["lvlm_region", "lvlm_region.*"]),
    python_requires=">=3.10",
    # torch is not pinned here: on CPU machines scripts/setup.sh installs the CPU build first; on GPU nodes
    # use the cluster's CUDA build. deepspeed needs torch at build time (installed without build isolation).
    install_requires=[
        "torch>=2.4",
        "deepspeed>=0.19.3",  # earlier versions crash non-reentrant checkpointing with frozen params (ZeRO-3)
        "transformers>=5.0,<6",
        "datasets>=3.0",
        "sentencepiece>=0.2",
        "protobuf",
        "safetensors",
        "pillow",
        "tqdm",
        "numpy",
        "matplotlib",  # plots of the cost report
        "peft>=0.13",  # --tuner lora
        "pyyaml",  # --config recipes
        "huggingface_hub",  # --model org/name: hub ids through the local cache
    ],
    extras_require={
        "track": TRACK,  # --report-to tensorboard / wandb
        "dev": ["pytest>=8", "hypothesis>=6", "ruff>=0.6", "psutil", *TRACK],  # the suite tests both trackers
        "gpu": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["lvlm-region = lvlm_region.commands:entry"]},
)
