"""vera-cli: VeRA and LoRA fine-tuning experiments on CIFAR-10."""

__version__ = "0.1.0"
