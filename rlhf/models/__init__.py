"""Models: building tiny local models, loading hub/local models with LoRA/QLoRA, saving."""
