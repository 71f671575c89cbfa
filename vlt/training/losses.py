"""Training losses fused with the LM head: no [tokens, vocab] logits tensor is ever built.

``linear_cross_entropy(h, weight, target)`` is mean next-token cross-entropy of ``h @ weight.T``;
``linear_kl_distill(h_s, w_s, h_t, w_t, temperature)`` is T^2 * mean over rows of
KL(softmax(h_t w_t^T / T) || softmax(h_s w_s^T / T)). Rows are the positions that count (the caller
gathers supervised or non-padding positions first, so the head runs on nothing else).

Both walk the rows in chunks of ``chunk`` (default: ~2^28 logits per chunk, 1 GiB in fp32) and,
when a gradient is wanted, compute the gradients with respect to ``h`` and ``weight`` in the same
pass (the softmax is at hand there), so backward is a multiplication by the incoming scalar and the
head is not recomputed. Matmuls run in the autocast dtype when autocast is on (bf16 on the GPU),
softmax and the loss in fp32, the weight gradient accumulates in fp32.

``impl``: ``torch`` (this file, every device), ``liger`` (Liger-Kernel's fused Triton kernels, CUDA
only, ``pip install vlt[cuda]``), ``auto`` (liger when it is importable and the tensors are on CUDA,
else torch). Tests: equal to the plain formulas (``cross_entropy_reference``,
``kl_distill_reference``) in value and gradients.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

IMPLS = ("auto", "torch", "liger")


def default_chunk(vocab: int) -> int:
    """Rows per chunk: a power of two with chunk * vocab <= 2^28, between 256 and 8192."""
    rows = max(256, min(8192, (1 << 28) // max(vocab, 1)))
    return 1 << (rows.bit_length() - 1)


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


@functools.cache
def _liger():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
        from liger_kernel.ops import LigerFusedLinearJSDFunction
    except Exception:  # noqa: BLE001 - not installed, or installed without a working Triton
        return None
    return liger_fused_linear_cross_entropy, LigerFusedLinearJSDFunction


def resolve_impl(impl: str, device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"loss_impl={impl!r}; allowed: {list(IMPLS)}")
    if impl == "liger":
        if device.type != "cuda" or _liger() is None:
            raise ValueError("loss_impl='liger' needs a CUDA device and liger-kernel (pip install 'vlt[cuda]'); "
                             "allowed here: ['auto', 'torch']")
        return "liger"
    if impl == "auto" and device.type == "cuda" and _liger() is not None:
        return "liger"
    return "torch"


# ---- cross-entropy ---------------------------------------------------------------------------------
class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, target, chunk: int, need_h: bool, need_w: bool, cd: torch.dtype):
        n = h.shape[0]
        w = weight.to(cd)
        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=h.device)
        with torch.autocast(h.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc = h[s:s + chunk].to(cd)
                tc = target[s:s + chunk]
                logits = (hc @ w.T).float()
                lse = torch.logsumexp(logits, -1)
                total += (lse - logits.gather(1, tc[:, None]).squeeze(1)).sum()
                if need_h or need_w:
                    g = torch.exp(logits.sub_(lse[:, None]))  # softmax, in place of the logits
                    g[torch.arange(g.shape[0], device=g.device), tc] -= 1.0
                    g = g.div_(n).to(cd)
                    if need_h:
                        grad_h[s:s + chunk] = (g @ w).to(h.dtype)
                    if need_w:
                        grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total / n

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, target: torch.Tensor, chunk: int | None = None,
                         impl: str = "torch") -> torch.Tensor:
    """Mean cross-entropy of ``h [N, D] @ weight [V, D].T`` against ``target [N]`` (every row counts;
    gather the supervised rows first). 0 (with a gradient path) when N is 0."""
    if h.shape[0] == 0:
        return (h.sum() + weight.sum()) * 0.0
    if resolve_impl(impl, h.device) == "liger":
        ce = _liger()[0]
        return ce(h.to(_compute_dtype(h)), weight.to(_compute_dtype(h)), target, reduction="mean")
    chunk = chunk or default_chunk(weight.shape[0])
    grad = torch.is_grad_enabled()
    return _LinearCrossEntropy.apply(h, weight, target, chunk, grad and h.requires_grad,
                                     grad and weight.requires_grad, _compute_dtype(h))


# ---- KL distillation -------------------------------------------------------------------------------
class _LinearKLDistill(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hs, ws, ht, wt, temperature: float, chunk: int, need_h: bool, need_w: bool,
                cd: torch.dtype):
        n = hs.shape[0]
        w_s, w_t = ws.to(cd), wt.to(cd)
        grad_h = torch.empty_like(hs) if need_h else None
        grad_w = torch.zeros(ws.shape, dtype=torch.float32, device=ws.device) if need_w else None
        total = torch.zeros((), dtype=torch.float32, device=hs.device)
        inv_t = 1.0 / temperature
        with torch.autocast(hs.device.type, enabled=False):
            for s in range(0, n, chunk):
                hc = hs[s:s + chunk].to(cd)
                log_p = torch.log_softmax((ht[s:s + chunk].to(cd) @ w_t.T).float().mul_(inv_t), -1)
                log_q = torch.log_softmax((hc @ w_s.T).float().mul_(inv_t), -1)
                p = log_p.exp()
                total += (p * (log_p - log_q)).sum()
                if need_h or need_w:
                    # d/dz_s of T^2 * KL / n = T / n * (softmax(z_s / T) - softmax(z_t / T))
                    g = log_q.exp_().sub_(p).mul_(temperature / n).to(cd)
                    if need_h:
                        grad_h[s:s + chunk] = (g @ w_s).to(hs.dtype)
                    if need_w:
                        grad_w += (g.T @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = ws.dtype
        return total * (temperature ** 2 / n)

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None, None, None, None


def linear_kl_distill(h_s: torch.Tensor, w_s: torch.Tensor, h_t: torch.Tensor, w_t: torch.Tensor,
                      temperature: float, chunk: int | None = None, impl: str = "torch") -> torch.Tensor:
    """T^2 * mean over rows of KL(teacher || student) at temperature T, logits ``h @ w.T`` formed a
    chunk at a time. The teacher side (``h_t``, ``w_t``) gets no gradient."""
    if h_s.shape[0] == 0:
        return (h_s.sum() + w_s.sum()) * 0.0
    h_t, w_t = h_t.detach(), w_t.detach()
    if resolve_impl(impl, h_s.device) == "liger":
        cd = _compute_dtype(h_s)
        # Liger's generalised JSD at beta=0 is KL(teacher || student), mean over rows, without T^2
        jsd = _liger()[1].apply(h_s.to(cd), w_s.to(cd), h_t.to(cd), w_t.to(cd), None, 0.0, -100, temperature)
        return jsd * temperature ** 2
    chunk = chunk or default_chunk(w_s.shape[0])
    grad = torch.is_grad_enabled()
    return _LinearKLDistill.apply(h_s, w_s, h_t, w_t, float(temperature), chunk, grad and h_s.requires_grad,
                                  grad and w_s.requires_grad, _compute_dtype(h_s))


# ---- the plain formulas (tests, and logits that already exist) -------------------------------------
def cross_entropy_reference(logits, target):
    return F.cross_entropy(logits.float(), target)


def kl_distill_reference(student_logits, teacher_logits, mask, temperature: float):
    """T^2 * mean over masked positions of KL(softmax(t/T) || softmax(s/T))."""
    t = F.log_softmax(teacher_logits.float() / temperature, -1)
    s = F.log_softmax(student_logits.float() / temperature, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    return (kl * mask).sum() / mask.sum().clamp(min=1) * temperature ** 2
