"""Fine-tuning for the streaming layout: `speakwatch finetune`, its data, the synthetic seeing task and the
built-in watching checkpoint's recipe (docs/training.md)."""
