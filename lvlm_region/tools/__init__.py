"""What is built on training: standalone evaluation, layer importance, pruning, the region comparison and the cost
report."""
