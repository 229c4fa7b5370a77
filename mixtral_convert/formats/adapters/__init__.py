"""What sits on a base checkpoint: `accessory_peft` (Accessory's mixtral_peft saves, read alone or on
a base) and HF PEFT LoRA adapters (`config` reads adapter_config.json, `hf` maps the weights onto
canonical tensors and applies them, `summary` is inspect's view of an adapter directory)."""
