"""Parameter-efficient adapters for nn.Linear layers: VeRA and LoRA."""
