"""Fine-tuning a tiny vision-language model on synthetic scenes."""
