"""lvlm_region: train LLaVA-style vision-language models with a sparse region of LLM layers."""
__version__ = "0.1.0"
