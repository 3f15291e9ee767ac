"""The data side: training data formats, chat templates, images, preparation, batches, the embedded demo."""
