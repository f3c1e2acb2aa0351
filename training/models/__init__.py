"""Models: the base (teacher) model loaders, text conditioning, the tiny built-ins, the LoRA adapters
on the shared UNet, and the reward models of the feedback stage."""
