"""The model side: region specs, the model families (families/), loading, LoRA, which parameters train, the
projector's files, assembling a Llava, the loss and the FLOP model."""
