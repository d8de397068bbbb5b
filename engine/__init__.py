"""QLoRA fine-tuning engine for Korean financial-security QA (FSKU)."""
