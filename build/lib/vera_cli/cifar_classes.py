"""CIFAR-10's class names, in label order: a module of its own so that shell completion reads them without torch."""

CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
