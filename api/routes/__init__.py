"""One router per resource: files, fine-tuning jobs, models, health."""
