"""Can the tiny vision tower read? Its features of the `ocr` task's images (one character, 56x56) classified
by a linear head, trained directly: a check that the glyphs reach the tower's output at all, apart from
the language model learning to read them through the answer tokens.

  OMP_NUM_THREADS=1 python tools/ocr_probe.py [--steps 300] [--batch 64] [--save vit.pth]

``--save``: the trained ViT's state dict, for ``vision.weights_file`` (a tower that can already read, as a
real VLM's pretrained one can).

On 2026-12-02 (a 2-core CPU, tiny-hybrid's ViT: 64 dims, 2 blocks, 14-pixel patches) it reached 86% on its
training batch after 300 steps of 64 images and 92% after 400 (chance 1/36), while `vlt fit --config
layouts/base` on the same task (`ocr`, length 1) stayed at chance for 600 steps of ~100 samples (val answer
accuracy 1.6-3.1%). The same fit with this probe's ViT as `vision.weights_file`
(`--model.init_args.model={"vision": {"weights_file": "vit.pth"}}`) reached 12.5 / 33 / 73 / 91% at steps
100 / 200 / 300 / 400: the random tower, not the decoder, is what keeps the studies' OCR at chance."""
import argparse
import random
import string
import time

import torch

from vlt.data.image import ImageProcessor
from vlt.data.synthetic import gen_ocr
from vlt.testing import tiny_model


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--save", default=None, help="write the trained ViT's state dict here (.pth)")
    a = p.parse_args()
    torch.manual_seed(0)
    tower, proc, rng = tiny_model().vision.train(), ImageProcessor(), random.Random(0)
    alphabet = string.ascii_uppercase + string.digits

    def batch(n):
        recs = [gen_ocr(rng, image_size=56, length=1) for _ in range(n)]
        return [proc(r.images[0]) for r in recs], torch.tensor([alphabet.index(r.meta["answer"]) for r in recs])

    tokens = tower(batch(1)[0]).shape   # [merged tokens of one image, D]
    head = torch.nn.Linear(tokens.numel(), len(alphabet))
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=a.lr)
    t0 = time.time()
    for step in range(a.steps + 1):
        xs, ys = batch(a.batch)
        logits = head(tower(xs).reshape(a.batch, -1))
        loss = torch.nn.functional.cross_entropy(logits, ys)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0:
            acc = (logits.argmax(-1) == ys).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy {acc:.1%} ({time.time() - t0:.0f} s)",
                  flush=True)
    if a.save:
        torch.save(tower.vit.state_dict(), a.save)
        print(f"saved the ViT to {a.save} (vision.weights_file)")


if __name__ == "__main__":
    main()
