"""SmolVLM2 (``smolvlm``: SmolVLM2-256M/500M/2.2B-Instruct): Idefics3's image splitting, tokens and connector.

Its processor writes the same row / column / global-image string as Idefics3's (``get_image_prompt_string``), so the
image layout is ``idefics3.SplitImages``. SmolVLMProcessor cannot be constructed without torchvision (its video
processor), so the tokenizer and the image processor load on their own (``qwen2_vl.SplitProcessor``, which copies
processor_config.json into the export) and ``image_seq_len`` comes from processor_config.json. Videos are not
supported for training.
"""
from __future__ import annotations

from .idefics3 import Idefics3
from .qwen2_vl import SplitProcessor


class SmolVLM(Idefics3):
    model_types = ("smolvlm",)
    title = "SmolVLM2 (SmolVLM2-256M/500M/2.2B-Instruct)"
    image_processor_class = "SmolVLMImageProcessorPil"

    def load_processor(self, path: str) -> SplitProcessor:
        processor = SplitProcessor(path)
        seq = processor.processor_config().get("image_seq_len")
        if seq is not None:
            processor.image_seq_len = seq  # checked against the model's pixel shuffle in image_layout
        return processor


FAMILY = SmolVLM()
