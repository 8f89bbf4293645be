"""LightningModules for common fine-tuning tasks on Hugging Face models."""

from lightning_dynq.tasks.causal_lm import CausalLM
from lightning_dynq.tasks.classification import TextClassifier

__all__ = ["CausalLM", "TextClassifier"]
