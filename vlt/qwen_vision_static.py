"""A fixed-grid, host-sync-free forward of transformers' Qwen2.5-VL vision tower, for CUDA graphs.

HF's ``Qwen2_5_VisionTransformerPretrainedModel.forward`` rebuilds the rotary table and the window
order from ``grid_thw`` on every call, reads ``cu_seqlens`` back to the host (``.tolist()``) and runs
one SDPA call per window: slow for its FLOPs (benchmarks/README.md), and nothing a
CUDA graph can capture. ``StaticQwenVision(visual, grid_thw)`` computes all of that once for one grid
and then runs the HF module's own submodules and weights (patch_embed's projection, the blocks' norms,
qkv / proj and MLPs, the merger) with fixed shapes:

- tokens are kept in HF's window order for the whole tower (merged units grouped window by window,
  windows in raster order, units in raster order inside a window), so a window is a contiguous run;
- window layers: when every window holds the same number of tokens, the frame is reshaped to
  [frames * windows, heads, window_len, head_dim] for one SDPA call; otherwise every window is padded
  to the longest one (a precomputed gather) and the padding keys are masked out, still one SDPA call;
- full-attention layers (``fullatt_block_indexes``): one SDPA call over each frame's tokens;
- the 2D rotary cos / sin table (fp32, as HF applies it) comes from the module's own ``inv_freq``;
- the merger's output is put back into raster order of the merged grid by a precomputed inverse.

A grid (t, h, w) in patch units is t frames of h x w patches, each attended on its own (HF's
semantics for such a ``grid_thw`` row), so several frames of one size go through in one call.
``graphed()`` captures the forward in a CUDA graph for a static input buffer.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _block(blk, x, cos, sin, seq_len: int, padding=None, mlp=None):
    """One vision block on x [frames, tokens, dim] (window order); attention within runs of ``seq_len``
    consecutive tokens (a window, or the whole frame for full-attention layers). ``padding``, for
    unequal windows: (gather [windows * L], scatter [tokens], key_mask [windows, 1, 1, L]) - every window
    is padded to L = the longest window's length and its padding keys are masked out, so attention costs
    windows * L^2 as HF's per-window loop does, not tokens^2 as a block-diagonal mask over the frame
    would. ``mlp``: the block MLP's aligned weights (``aligned_mlp``), or None to run the module."""
    t, n, d = x.shape
    attn = blk.attn
    heads = attn.num_heads
    q, k, v = attn.qkv(blk.norm1(x)).view(t, n, 3, heads, d // heads).unbind(2)
    q = (q.float() * cos + _rotate_half(q.float()) * sin).to(v.dtype)
    k = (k.float() * cos + _rotate_half(k.float()) * sin).to(v.dtype)
    mask = None
    if padding is not None:
        gather, scatter, key_mask = padding
        q, k, v = (z[:, gather] for z in (q, k, v))          # [t, windows * L, heads, head_dim]
        mask = key_mask.repeat(t, 1, 1, 1)
    q, k, v = (z.reshape(-1, seq_len, heads, z.shape[-1]).transpose(1, 2) for z in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=attn.scaling)
    o = o.transpose(1, 2).reshape(t, -1, d)
    if padding is not None:
        o = o[:, scatter]       # drop the padding rows (their outputs, and so their gradients)
    x = x + attn.proj(o)
    h = blk.norm2(x)
    if mlp is None:
        return x + padded_mlp(blk.mlp, h)
    w_gate_up, b_gate_up, w_down, b_down = mlp
    gate, up = F.linear(h, w_gate_up, b_gate_up).chunk(2, dim=-1)
    return x + F.linear(blk.mlp.act_fn(gate) * up, w_down, b_down)


def padded_mlp(mlp, h, multiple: int = 64):
    """``mlp(h)`` with the hidden width padded to a multiple of ``multiple`` on the fly: the training
    tower's form of ``aligned_mlp`` (the same GEMMs; see there why), with the padded weights built from
    the parameters in each call, so gradients, FSDP and the optimizer see the module's own parameters.
    The copies are a few MB a layer; cuBLAS's sm80 kernels for 3420-wide rows took 81 ms of a 4B
    stage-2 step on the H200 (the tower's 96 MLP GEMMs). LoRA-wrapped or bias-free MLPs run as they are."""
    lins = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    width = mlp.gate_proj.out_features
    pad = -width % multiple
    if not pad or not all(type(lin) is torch.nn.Linear and lin.bias is not None for lin in lins):
        return mlp(h)
    gate, up, down = lins
    w_gate_up = torch.cat([F.pad(gate.weight, (0, 0, 0, pad)), F.pad(up.weight, (0, 0, 0, pad))])
    b_gate_up = torch.cat([F.pad(gate.bias, (0, pad)), F.pad(up.bias, (0, pad))])
    g, u = F.linear(h, w_gate_up, b_gate_up).chunk(2, dim=-1)
    return F.linear(mlp.act_fn(g) * u, F.pad(down.weight, (0, pad)), down.bias)


def aligned_mlp(mlp, multiple: int = 64):
    """The MLP's weights in buffers padded to a hidden width that is a multiple of ``multiple``, gate
    and up stacked: (w_gate_up [2P, D], b_gate_up [2P], w_down [D, P], b_down [D]); None when the
    projections are not plain Linears with biases (LoRA-wrapped: the module runs as it is).

    Qwen2.5-VL's vision MLP is 3420 wide: rows of 3420 bf16 values are only 8-byte aligned and cuBLAS
    takes slow sm80 kernels for those GEMMs (most of the tower's time per frame: benchmarks/README.md).
    The module's own parameters are re-pointed at views of these buffers (same shapes, names and
    values; the down projection's view is strided), so no weight is held twice and later in-place
    updates reach both. Zero pad rows give act(0) * 0 = 0
    and zero pad columns read nothing: the output is unchanged."""
    lins = (mlp.gate_proj, mlp.up_proj, mlp.down_proj)
    if not all(type(lin) is torch.nn.Linear and lin.bias is not None for lin in lins):
        return None
    gate, up, down = lins
    cached = getattr(mlp, "_vlt_aligned", None)
    if cached is not None and cached[0].data_ptr() == gate.weight.data_ptr():
        return cached        # built before, and the parameters still live in its buffers
    width, dim = gate.out_features, gate.in_features
    P = width + (-width % multiple)
    w_gu = gate.weight.new_zeros(2 * P, dim)
    b_gu = gate.bias.new_zeros(2 * P)
    w_down = down.weight.new_zeros(down.out_features, P)
    with torch.no_grad():
        for half, lin in enumerate((gate, up)):
            w_gu[half * P:half * P + width] = lin.weight
            b_gu[half * P:half * P + width] = lin.bias
            lin.weight.data = w_gu[half * P:half * P + width]
            lin.bias.data = b_gu[half * P:half * P + width]
        w_down[:, :width] = down.weight
        down.weight.data = w_down[:, :width]
    mlp._vlt_aligned = (w_gu, b_gu, w_down, down.bias)
    return mlp._vlt_aligned


class StaticQwenVision:
    """``visual(pixel_values, grid_thw=[grid_thw]).pooler_output`` for one fixed ``grid_thw``.

    ``tower_or_visual``: a ``vlt.qwen_vision.QwenVisionTower`` or the HF module itself (its weights
    are used in place, so later weight updates are seen; build it after moving the module to its
    device). ``grid_thw``: (frames, patch rows, patch cols), rows and cols multiples of the merge size.
    """

    def __init__(self, tower_or_visual, grid_thw, compile: str | None = None, align_mlp: bool = True):
        visual = getattr(tower_or_visual, "visual", tower_or_visual)
        self.visual = visual
        # compile: a torch.compile backend for the block (one compiled copy serves every block of a
        # kind): Inductor fuses the RMSNorms, the fp32 rotary and the MLP's gating around the GEMMs.
        self.block = _block if compile is None else torch.compile(_block, backend=compile, dynamic=False)
        t, gh, gw = (int(v) for v in grid_thw)
        m = visual.spatial_merge_size
        if t < 1 or gh % m or gw % m or gh < m or gw < m:
            raise ValueError(f"grid_thw={tuple(grid_thw)} must be (frames >= 1, rows, cols) with rows and cols "
                             f"positive multiples of spatial_merge_size={m}")
        units_per_window_side = visual.window_size // m // visual.patch_size
        if units_per_window_side < 1:
            raise ValueError(f"window_size={visual.window_size} is smaller than patch_size * spatial_merge_size = "
                             f"{visual.patch_size * m}")
        proj = visual.patch_embed.proj
        self.device, self.dtype = proj.weight.device, proj.weight.dtype
        self.grid_thw = (t, gh, gw)
        self.frames, self.tokens = t, gh * gw          # tokens (patches) per frame
        self.unit = m * m                              # patches per merged token
        self.patch_dim = proj.weight[0].numel()        # C * T * P * P
        self.full_layers = {int(i) for i in visual.fullatt_block_indexes}
        # align_mlp=False (training): the MLP modules run as they are, so their parameters stay where the
        # optimizer, FSDP and LoRA put them; aligned_mlp re-points them at padded buffers (inference)
        self.mlps = [aligned_mlp(blk.mlp) if align_mlp else None for blk in visual.blocks]

        # Window order of the merged units: sort by (window row, window col, unit index) - the unit
        # index is raster order, which is also raster order inside a window.
        lh, lw = gh // m, gw // m
        r = torch.arange(lh).repeat_interleave(lw)
        c = torch.arange(lw).repeat(lh)
        windows_per_row = -(-lw // units_per_window_side)
        window_id = (r // units_per_window_side) * windows_per_row + c // units_per_window_side
        unit_order = torch.argsort(window_id * (lh * lw) + r * lw + c)
        window_tokens = torch.bincount(window_id) * self.unit    # every window id is hit: no empty windows
        self.unit_order = unit_order.to(self.device)
        self.unit_inverse = torch.argsort(unit_order).to(self.device)
        self.window_tokens = window_tokens.tolist()
        self.equal_windows = len(set(self.window_tokens)) == 1
        self.window_padding = None
        if not self.equal_windows:  # pad every window to the longest; see _block
            longest = max(self.window_tokens)
            starts = torch.cumsum(window_tokens, 0) - window_tokens
            slot = torch.arange(longest)
            valid = slot[None, :] < window_tokens[:, None]                  # [windows, longest]
            gather = torch.where(valid, starts[:, None] + slot[None, :], 0).flatten()
            scatter = torch.nonzero(valid.flatten()).flatten()              # window order of the real tokens
            self.window_padding = tuple(z.to(self.device) for z in (gather, scatter, valid[:, None, None, :]))

        # Rotary: patch (i, j) of merged unit (r, c) sits at row r*m + i, col c*m + j; HF rotates the whole
        # head dim with [h freqs, w freqs] twice over, in fp32, scaled by attention_scaling (1 for axial).
        i = torch.arange(m).repeat_interleave(m)
        j = torch.arange(m).repeat(m)
        rows = (r[unit_order, None] * m + i).flatten()
        cols = (c[unit_order, None] * m + j).flatten()
        rope = visual.rotary_pos_emb
        inv_freq = rope.inv_freq.float()
        positions = torch.stack([rows, cols], -1).to(inv_freq.device, torch.float)   # [tokens, 2]
        angles = (positions[..., None] * inv_freq).flatten(1)                          # [h freqs, w freqs]
        angles = torch.cat([angles, angles], -1).to(self.device)
        scaling = getattr(rope, "attention_scaling", 1.0)
        self.cos = (angles.cos() * scaling)[:, None, :]  # [tokens, 1 (heads), head_dim]
        self.sin = (angles.sin() * scaling)[:, None, :]

    def _attention_layout(self, windowed: bool):
        """(tokens per attention run, padding) of one layer: windows or the whole frame."""
        if not windowed:
            return self.tokens, None
        if self.equal_windows:
            return self.window_tokens[0], None
        return max(self.window_tokens), self.window_padding

    def _check_input(self, pixel_values: torch.Tensor):
        expected = (self.frames * self.tokens, self.patch_dim)
        if tuple(pixel_values.shape) != expected:
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)} do not fit grid_thw={self.grid_thw}, "
                             f"the grid this StaticQwenVision was built for: it takes {expected[0]} patches "
                             f"(frames * rows * cols) of {expected[1]} values (C*T*P*P); build one for the new grid")

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [frames * tokens, C*T*P*P] (HF processor order) -> [frames * tokens / merge^2, out]."""
        self._check_input(pixel_values)
        return self.features(pixel_values, self.frames)

    def features(self, pixel_values: torch.Tensor, frames: int) -> torch.Tensor:
        """``forward`` for any number of frames of this grid's size (the tables are per frame): what the
        training tower uses to run all images of one size in one call per layer."""
        t, n, u = frames, self.tokens, self.unit
        proj = self.visual.patch_embed.proj
        # The Conv3d's kernel equals its stride and covers one patch: a matmul with the flattened weight.
        x = F.linear(pixel_values.to(self.dtype), proj.weight.flatten(1), proj.bias)
        d = x.shape[-1]
        x = x.view(t, n // u, u, d)[:, self.unit_order].reshape(t, n, d)
        for idx, blk in enumerate(self.visual.blocks):
            seq_len, padding = self._attention_layout(windowed=idx not in self.full_layers)
            x = self.block(blk, x, self.cos, self.sin, seq_len, padding, self.mlps[idx])
        merged = self.visual.merger(x.reshape(t * n, d))
        return merged.view(t, n // u, -1)[:, self.unit_inverse].reshape(t * n // u, -1)

    __call__ = forward

    def graphed(self, warmup: int = 3):
        """A callable ``pixel_values -> features`` replaying this forward from a CUDA graph.

        The input is copied into a static buffer; the returned tensor is the graph's static output,
        overwritten by the next call (clone it to keep it)."""
        if self.device.type != "cuda":
            raise ValueError(f"graphed() needs the vision tower on a CUDA device, not {self.device}")
        static_in = torch.zeros(self.frames * self.tokens, self.patch_dim, device=self.device, dtype=self.dtype)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.no_grad(), torch.cuda.stream(side):  # warm-up: allocator and kernel choices settle
            for _ in range(warmup):
                self.forward(static_in)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            static_out = self.forward(static_in)

        def replay(pixel_values: torch.Tensor) -> torch.Tensor:
            self._check_input(pixel_values)
            static_in.copy_(pixel_values)
            graph.replay()
            return static_out
        return replay
