"""Causal-LM loss computed only where it counts: at the supervised positions.

A decoder's largest single matmul in fine-tuning is often the output projection: (B*T, H) @ (H, V)
with V = 49,152 for SmolLM2, followed by a (B*T, V) fp32 softmax. With the loss on completions only
(the QLoRA recipe), most positions are prompt or padding and their logits are thrown away. So we
run the decoder body, keep the hidden states at positions whose *next* token is supervised, and
project just those: (N, H) -> (N, V) with N the number of supervised tokens. The same idea is
torchtune's "chunked/masked output" and Liger's fused linear cross-entropy. In training the (N, V)
block is never whole: `LinearCrossEntropy` works through it CE_CHUNK rows at a time and makes the
gradient as it goes (See Note: gradient in forward); a head it cannot stand in for (trainable,
biased, adapted) takes the checkpointed chunks of Note: chunked cross-entropy.

Works for any `*ForCausalLM` that exposes `get_decoder()` and `get_output_embeddings()` and applies
no transformation to the logits (no soft-capping, no logit scale); otherwise it falls back to the
model's own full logits so the numbers stay right.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from qlora_core.fused import matmul_dtype

IGNORE_INDEX = -100
# Supervised positions per chunk of the output projection (see Note: chunked cross-entropy).
CE_CHUNK = 256

# Config attributes that mean "the model post-processes its logits": the shortcut would skip them.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling")


@dataclass
class LossParts:
    """Sums, not means, so callers can weight by tokens across micro-batches and steps."""

    loss_sum: torch.Tensor  # scalar fp32, differentiable: sum of token cross-entropies
    n_correct: int  # argmax == label at supervised positions
    n_tokens: int  # supervised positions


def count_supervised(labels: torch.Tensor) -> int:
    """Supervised positions after the causal shift (label at t+1 predicted from position t)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def _split_causal_lm(model: torch.nn.Module) -> tuple[torch.nn.Module, torch.nn.Module] | None:
    """Return (decoder body, output projection) of a (PEFT-wrapped) causal LM, or None if unknown."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    get_decoder = getattr(base, "get_decoder", None)
    get_head = getattr(base, "get_output_embeddings", None)
    if get_decoder is None or get_head is None:
        return None
    config = getattr(base, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in _LOGIT_TRANSFORMS):
        return None
    try:
        decoder, head = get_decoder(), get_head()
    except (AttributeError, NotImplementedError):
        return None
    if decoder is None or head is None or decoder is base:
        return None
    return decoder, head


def supports_supervised_logits(model: torch.nn.Module) -> bool:
    """Whether `causal_lm_loss(..., supervised_only=True)` can take the shortcut for this model."""
    return _split_causal_lm(model) is not None


def causal_lm_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor], supervised_only: bool = True) -> LossParts:
    """Next-token cross-entropy summed over supervised positions, and the number right.

    Args:
        model: a causal LM, optionally wrapped by PEFT.
        batch: `input_ids` (B, T), `labels` (B, T) with -100 where not supervised, and any extra
            model inputs from `qlora_core.data.collate` (attention mask, position ids).
        supervised_only: project to the vocabulary only at supervised positions (see module doc).

    Returns:
        `LossParts` with the fp32 summed loss (differentiable), correct-token and token counts.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    split = _split_causal_lm(model) if supervised_only else None
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    if split is not None:
        decoder, head = split
        hidden = decoder(**inputs, use_cache=False).last_hidden_state  # (B, T, H)
        picked = hidden[:, :-1][keep]  # (N, H)
        gold = target[keep]  # (N,)
        return _chunked_head_loss(head, picked, gold)
    full = model(**inputs, use_cache=False).logits  # (B, T, V)
    logits = full[:, :-1][keep]  # (N, V)
    gold = target[keep]
    # Note: fp32 cross-entropy. bf16 logits have ~3 significant digits; the log-sum-exp over 49k
    # entries in bf16 visibly biases the loss, so we upcast the (N, V) block (small, see above).
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, gold, reduction="sum")
    with torch.no_grad():
        n_correct = int((logits.argmax(dim=-1) == gold).sum())
    return LossParts(loss_sum=loss_sum, n_correct=n_correct, n_tokens=int(gold.numel()))


def _head_loss(head: torch.nn.Module, hidden: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed fp32 cross-entropy and the number right for one chunk. See Note: fp32 cross-entropy."""
    logits = head(hidden).float()  # (n, V)
    loss_sum = F.cross_entropy(logits, gold, reduction="sum")
    n_correct = (logits.detach().argmax(dim=-1) == gold).sum()
    return loss_sum, n_correct


class LinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of `hidden @ weight^T` against `gold`, with its gradient made in forward.

    # Note: gradient in forward. The loss is the last node of the graph and the output projection
    # is frozen (lm_head, or the tied embedding), so d loss / d hidden depends on nothing backward
    # will know except the scalar that scales the loss. Each chunk's gradient is therefore made
    # while its logits are at hand, (softmax - onehot) @ W, and kept as one (n, H) block; backward
    # only multiplies it by that scalar. Compared with checkpointing each chunk (See Note: chunked
    # cross-entropy), this skips the recompute of the (n, H) @ (H, V) projection, one of its three
    # matmuls, and holds the same one chunk of logits at a time. (Liger-Kernel's
    # FusedLinearCrossEntropy does the same on GPU.)
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        n_correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        # Note: head buffers. One chunk's logits (compute dtype) and their fp32 exponentials are
        # allocated once and reused by every chunk: on a CPU a fresh 50 MB block per chunk is 12k
        # page faults, and the passes below touch each logit five times instead of eight.
        rows_max = min(CE_CHUNK, n_rows)
        logits_buf = torch.empty((rows_max, vocab), dtype=hidden.dtype, device=hidden.device)
        exp_buf = torch.empty((rows_max, vocab), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, CE_CHUNK):
            nll, right = _ce_chunk(hidden, weight, gold, start, logits_buf, exp_buf, grad_hidden)
            n_correct += right
            loss_sum += nll.sum()
        ctx.save_for_backward(grad_hidden)
        ctx.mark_non_differentiable(n_correct)
        return loss_sum, n_correct

    @staticmethod
    def backward(ctx, grad_loss: torch.Tensor, _grad_correct: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_loss).to(grad_hidden.dtype), None, None


def _ce_chunk(hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor, start: int, logits_buf: torch.Tensor,
              exp_buf: torch.Tensor, grad_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One chunk of Note: gradient in forward: the chunk's per-token fp32 cross-entropy (n,) and its
    number right; d(token loss)/d hidden is written into `grad_hidden[start : start + n]`."""
    h, g = hidden[start : start + CE_CHUNK], gold[start : start + CE_CHUNK]  # (n, H), (n,)
    n = h.shape[0]
    rows = torch.arange(n, device=g.device)
    logits = torch.mm(h, weight.t(), out=logits_buf[:n])  # (n, V)
    top, best = logits.max(dim=-1)  # (n,), (n,)
    right = (best == g).sum()
    top = top.float()
    # See Note: fp32 cross-entropy: exp(logit - max) and its sum in fp32.
    expd = torch.sub(logits, top[:, None], out=exp_buf[:n]).exp_()  # (n, V)
    total = expd.sum(dim=-1)  # (n,)
    nll = top + total.log() - logits[rows, g].float()  # (n,)
    # softmax - onehot = (exp - total * onehot) / total, rounded once into the logits' buffer
    expd[rows, g] -= total
    grad_logits = torch.mul(expd, total.reciprocal()[:, None], out=logits)  # (n, V)
    torch.mm(grad_logits, weight, out=grad_hidden[start : start + n])  # (n, H)
    return nll, right


class LinearTokenNLL(torch.autograd.Function):
    """Per-token cross-entropy (N,) of `hidden @ weight^T` against `gold`, gradient made in forward.

    The per-token form of `LinearCrossEntropy` for losses that weight tokens differently (DPO sums
    them per sequence and scales each sequence by its own factor): the same chunks and buffers, and
    backward scales each row of the saved gradient by its token's upstream gradient.
    """

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
        n_rows, vocab = hidden.shape[0], weight.shape[0]
        grad_hidden = torch.empty_like(hidden)  # (N, H)
        nll = torch.empty(n_rows, dtype=torch.float32, device=hidden.device)  # (N,)
        rows_max = max(min(CE_CHUNK, n_rows), 1)
        logits_buf = torch.empty((rows_max, vocab), dtype=hidden.dtype, device=hidden.device)
        exp_buf = torch.empty((rows_max, vocab), dtype=torch.float32, device=hidden.device)
        for start in range(0, n_rows, CE_CHUNK):
            part, _ = _ce_chunk(hidden, weight, gold, start, logits_buf, exp_buf, grad_hidden)
            nll[start : start + part.shape[0]] = part
        ctx.save_for_backward(grad_hidden)
        return nll

    @staticmethod
    def backward(ctx, grad_nll: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden.float() * grad_nll[:, None]).to(grad_hidden.dtype), None, None


def token_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy at the supervised positions, and the batch row of each.

    The supervised-position-only projection of `causal_lm_loss` (the decoder body, then the output
    head on the N positions whose next token is supervised), returning the tokens' losses rather
    than their sum: (N,) fp32, differentiable, and (N,) row indices into the batch.
    """
    labels = batch["labels"]  # (B, T)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    target = labels[:, 1:]  # (B, T-1)
    keep = target != IGNORE_INDEX  # (B, T-1)
    rows = keep.nonzero()[:, 0]  # (N,)
    gold = target[keep]  # (N,)
    split = _split_causal_lm(model)
    if split is None:
        logits = model(**inputs, use_cache=False).logits[:, :-1][keep].float()  # (N, V)
        return F.cross_entropy(logits, gold, reduction="none"), rows
    decoder, head = split
    picked = decoder(**inputs, use_cache=False).last_hidden_state[:, :-1][keep]  # (N, H)
    if torch.is_grad_enabled() and picked.requires_grad and _frozen_plain_head(head):
        dtype = matmul_dtype(picked, picked.dtype)
        return LinearTokenNLL.apply(picked.to(dtype), head.weight.to(dtype), gold), rows
    parts = []
    for start in range(0, picked.shape[0], CE_CHUNK):  # See Note: chunked cross-entropy
        h, g = picked[start : start + CE_CHUNK], gold[start : start + CE_CHUNK]
        if torch.is_grad_enabled() and picked.requires_grad:
            parts.append(checkpoint(_head_token_nll, head, h, g, use_reentrant=False))
        else:
            parts.append(_head_token_nll(head, h, g))
    nll = torch.cat(parts) if parts else picked.float().sum(dim=-1)[:0]
    return nll, rows


def _head_token_nll(head: torch.nn.Module, hidden: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(hidden).float(), gold, reduction="none")


def _frozen_plain_head(head: torch.nn.Module) -> bool:
    """An output projection `LinearCrossEntropy` can stand in for: a bias-free, frozen Linear."""
    return type(head) is torch.nn.Linear and head.bias is None and not head.weight.requires_grad


def _chunked_head_loss(head: torch.nn.Module, picked: torch.Tensor, gold: torch.Tensor) -> LossParts:
    """The loss at supervised positions, projected through `head` CE_CHUNK positions at a time.

    # Note: chunked cross-entropy. Even restricted to supervised positions, the (N, V) logits of a
    # 49k vocabulary are the largest tensors of a step: with N ~ 500 the bf16 projection, its fp32
    # copy, the log-softmax and its gradient hold ~350 MB at once. Each chunk of CE_CHUNK positions
    # is checkpointed instead: only its (n, H) input is kept, and backward recomputes its logits
    # (one extra (n, H) @ (H, V) matmul), so at most one chunk's logits are alive. The sum over
    # chunks equals the unchunked loss up to fp32 summation order.
    """
    train = torch.is_grad_enabled() and picked.requires_grad
    if train and _frozen_plain_head(head):
        dtype = matmul_dtype(picked, picked.dtype)
        loss_sum, right = LinearCrossEntropy.apply(picked.to(dtype), head.weight.to(dtype), gold)
        return LossParts(loss_sum=loss_sum, n_correct=int(right), n_tokens=int(gold.numel()))
    loss_sum = picked.float().sum() * 0.0  # a zero in the graph, so a chunkless batch still backprops
    n_correct = 0
    for start in range(0, picked.shape[0], CE_CHUNK):
        h, g = picked[start : start + CE_CHUNK], gold[start : start + CE_CHUNK]  # (n, H), (n,)
        if train:
            part, right = checkpoint(_head_loss, head, h, g, use_reentrant=False)
        else:
            part, right = _head_loss(head, h, g)
        loss_sum = loss_sum + part
        n_correct += int(right)
    return LossParts(loss_sum=loss_sum, n_correct=n_correct, n_tokens=int(gold.numel()))
