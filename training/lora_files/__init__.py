"""LoRA files: the kohya format (read / write), the bridge to live peft adapters, merging, and the
run's exports (stage files, the unified LoRA, the full 1-step UNet folder)."""
