"""Files in and out: atomic safetensors/JSON writes, checkpoints, LoRA adapter files, Hugging Face GPT-2 and
PEFT formats, and the pretrained model that ships with the package."""
