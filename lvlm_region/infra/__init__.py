"""Infrastructure with no model in it: the output directory's rules and atomic writes, timing and MFU, experiment
trackers, models by hub id."""
