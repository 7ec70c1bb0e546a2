"""The reference core: the math of a GPT-2, LoRA and the methods it is compared with, as the derivation reads.

Read in this order: backend (which array module), functional (the forward/backward pairs), nn (Parameter,
Module, the layers), model (GPT), optim, lora, adapters, prefix, methods, intrinsic, gradcheck.
Nothing here is tuned for speed; ``minilora.fast`` holds faster versions of the same pairs, tested equal.
"""
