"""The composed tiny VLM: forward/backward with images, decode == full-prefix recomputation,
packing, and the errors a bad batch gets."""
import pytest
import torch

from vlt.layers import state_nbytes
from vlt.model import shift_labels
from vlt.testing import TINY_IMAGE_TOKEN_ID, tiny_model

IMG = TINY_IMAGE_TOKEN_ID  # tiny-hybrid's <|image_pad|> id


def batch_with_image(B=2, n_text=10):
    ids = torch.randint(0, 256, (B, n_text + 4))
    ids[:, 3:7] = IMG  # one 56x56 image -> 2x2 merged tokens per row
    images = [torch.randn(3, 56, 56) for _ in range(B)]
    return ids, images


def test_forward_backward_reaches_vision_and_every_layer():
    m = tiny_model().train()
    ids, images = batch_with_image()
    out = m(ids, labels=ids, images=images)
    assert out.logits.shape == (2, 14, 272) and torch.isfinite(out.loss)
    out.loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    # timm's unused pooling/head parts are absent (num_classes=0, global_pool=''), so everything trains
    assert no_grad == []


def test_vision_tower_keeps_the_images_order_across_sizes():
    """Images of two sizes interleaved: batched per size, the features come back in the images' order
    (each equal to the image encoded alone), and the gradient reaches each image through that reordering."""
    tower = tiny_model().vision.eval()
    images = [torch.randn(3, s, s, requires_grad=True) for s in (56, 84, 56, 84, 84)]
    feats = tower(images)
    alone = [tower([im]) for im in images]
    assert feats.shape[0] == sum(a.shape[0] for a in alone) == 2 * 4 + 3 * 9   # 2x2 and 3x3 merged tokens
    torch.testing.assert_close(feats, torch.cat(alone), atol=1e-5, rtol=1e-5)
    w = torch.randn_like(feats)
    (feats * w).sum().backward()
    grads = [im.grad.clone() for im in images]
    for im in images:
        im.grad = None
    (torch.cat(alone) * w).sum().backward()
    for g, im in zip(grads, images):
        torch.testing.assert_close(g, im.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mrope", [False, True])
def test_greedy_decode_equals_full_prefix_recompute(mrope):
    m = tiny_model(mrope=mrope)
    ids, images = batch_with_image(B=1)
    with torch.no_grad():
        out = m(ids, images=images, use_cache=True)
        state, seq = out.state, ids
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        cached = []
        for _ in range(12):  # beyond the SWA window of 6, so the ring buffer wraps
            cached.append(nxt)
            seq = torch.cat([seq, nxt], 1)
            o = m(nxt, state=state, use_cache=True)
            state = o.state
            full = m(seq, images=images).logits[:, -1]
            torch.testing.assert_close(o.logits[:, -1], full, rtol=1e-4, atol=1e-4)
            nxt = o.logits[:, -1].argmax(-1, keepdim=True)


def test_hybrid_state_constant_but_full_attention_grows():
    m = tiny_model(layout="[swa, gdn, linear, swa_gdn]")
    with torch.no_grad():
        st = m(torch.randint(0, 256, (1, 8)), use_cache=True).state
        sizes = []
        for _ in range(10):
            st = m(torch.randint(0, 256, (1, 1)), state=st, use_cache=True).state
            sizes.append(state_nbytes(st["layers"]))
    assert len(set(sizes)) == 1
    m = tiny_model(layout="[full, gdn]")
    with torch.no_grad():
        st = m(torch.randint(0, 256, (1, 8)), use_cache=True).state
        a = state_nbytes(st["layers"])
        st = m(torch.randint(0, 256, (1, 1)), state=st, use_cache=True).state
    assert state_nbytes(st["layers"]) > a


def test_packed_batch_equals_separate_rows():
    m = tiny_model()
    a, b = torch.randint(0, 256, (1, 9)), torch.randint(0, 256, (1, 13))
    cu = torch.tensor([0, 9, 22], dtype=torch.int32)
    with torch.no_grad():
        packed = m(torch.cat([a, b], 1), cu_seqlens=cu).logits
        torch.testing.assert_close(packed[:, :9], m(a).logits, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(packed[:, 9:], m(b).logits, rtol=1e-4, atol=1e-5)


def test_loss_never_predicts_across_packed_boundaries():
    labels = torch.arange(10)[None]
    cu = torch.tensor([0, 4, 10])
    t = shift_labels(labels, cu)
    assert t[0, 3] == -100 and t[0, 9] == -100 and t[0, 2] == 3 and t[0, 4] == 5


def test_image_token_count_mismatch_is_a_clear_error():
    m = tiny_model()
    ids, images = batch_with_image(B=1)
    with pytest.raises(ValueError, match=r"4 image tokens but the images give 8 features"):
        m(ids, images=images + images)
    with pytest.raises(ValueError, match=r"not a multiple of patch_size\*merge_size=28"):
        tiny_model(mrope=True)(ids, images=[torch.randn(3, 50, 56)])


def test_mrope_on_text_only_equals_1d_rope():
    torch.manual_seed(0)
    a, b = tiny_model(mrope=True), tiny_model(mrope=False)
    b.load_state_dict(a.state_dict())
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        # M-RoPE builds its tables through another path than 1-D RoPE: fp32 round-off only
        torch.testing.assert_close(a(ids).logits, b(ids).logits, rtol=1e-5, atol=1e-5)
