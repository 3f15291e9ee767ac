"""Training on DeepSpeed: the engine (the only module that imports deepspeed), checkpoints, setup, the planner, the
loop, the held-out evaluation it ends with, and the training command line."""
