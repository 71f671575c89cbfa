"""Can the tiny vision tower read? Its features of the `ocr` task's images (one character, 56x56) classified
by a linear head, trained directly: a check that the glyphs reach the tower's output at all, apart from
the language model learning to read them through the answer tokens. ``--task dense_ocr``: the images of
issue 17 row 2 (``--num-strings`` labelled ``--length``-digit lines, "K: 12", in ``--image-size`` pixels;
default 4 / 2 / 112 as tools/gpu-phenomena.sh), the target every line: its key letter (26 classes) and
each digit (10), one linear head over the flattened tower tokens, the mean cross-entropy over the slots,
the accuracy per slot every 50 steps. Each batch is freshly drawn and scored before its update: the
accuracies are on images the tower has not seen.

  OMP_NUM_THREADS=1 python tools/ocr_probe.py [--task ocr|dense_ocr] [--steps 300] [--batch 64] [--lr 2e-3]
      [--device cpu|cuda] [--save vit.pth]

``--save``: the trained ViT's state dict, for ``vision.weights_file`` (a tower that can already read, as a
real VLM's pretrained one can; ``vlt compare --model-options '{"vision": {"weights_file": "vit.pth"}}'``).

On 2026-12-02 (a 2-core CPU, tiny-hybrid's ViT: 64 dims, 2 blocks, 14-pixel patches) it reached 86% on its
training batch after 300 steps of 64 images and 92% after 400 (chance 1/36), while `vlt fit --config
layouts/base` on the same task (`ocr`, length 1) stayed at chance for 600 steps of ~100 samples (val answer
accuracy 1.6-3.1%). The same fit with this probe's ViT as `vision.weights_file`
(`--model.init_args.model={"vision": {"weights_file": "vit.pth"}}`) reached 12.5 / 33 / 73 / 91% at steps
100 / 200 / 300 / 400: the random tower, not the decoder, is what keeps the studies' OCR at chance.

``--task dense_ocr`` does not learn to read at this scale (2026-12-02, the same CPU, one thread, batch 64;
chance: 3.8% per key, 10% per digit, loss 2.62): at ``--lr 2e-3`` (default) the loss stayed at 2.62 and
every slot's accuracy between 0 and ~17% (batch noise) for 300 steps (39 s) and for 3000 (388 s);
``--lr 5e-4`` and ``--lr 6e-3`` the same for 1000 steps (148 / 149 s, two runs side by side). One line of one
digit (``--num-strings 1 --length 1``) only began to learn after ~200 steps: key 14%, digit 22% at step 300
(31 s). The glyphs are ~10 pixels, smaller than a 14-pixel patch, and the text block moves over the image:
four lines, each anywhere, are beyond a linear head on a 2-block 64-dim tower in these budgets, and the
tower it saves reads no better than a random one. Larger glyphs did not help either (the same day, at chance
when stopped: ``--image-size 224`` (stopped at step 50), ``--num-strings 2`` at 112 (stopped at step 300, loss
2.59)). gpu-phenomena.sh's row 2 (OCR_TOWER=probe) therefore uses ``--image-size 28`` (one character per
28-pixel image, 94% after 400 steps in 19 s) with dense_ocr's glyph grid (cell=28), one glyph per image token."""
import argparse
import random
import string
import time

import torch

from vlt.data.image import ImageProcessor
from vlt.data.synthetic import gen_dense_ocr, gen_ocr
from vlt.testing import tiny_model

OCR_ALPHABET = string.ascii_uppercase + string.digits


def task_sampler(a, rng: random.Random):
    """(slot groups [(name, number of slots, classes)], slot names, sample() -> (PIL image, labels per group))."""
    if a.task == "ocr":
        def sample():
            r = gen_ocr(rng, image_size=a.image_size, length=a.length)
            return r.images[0], [[OCR_ALPHABET.index(c) for c in r.meta["answer"]]]
        names = [f"char {i + 1}" for i in range(a.length)]
        return [("char", a.length, len(OCR_ALPHABET))], names, sample

    def sample():
        r = gen_dense_ocr(rng, image_size=a.image_size, num_strings=a.num_strings, length=a.length)
        keys, codes = r.meta["keys"], r.meta["codes"]
        return r.images[0], [[string.ascii_uppercase.index(k) for k in keys], [int(d) for c in codes for d in c]]
    names = [f"line {i + 1} key" for i in range(a.num_strings)]
    names += [f"line {i + 1} digit {j + 1}" for i in range(a.num_strings) for j in range(a.length)]
    return [("key", a.num_strings, 26), ("digit", a.num_strings * a.length, 10)], names, sample


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", choices=["ocr", "dense_ocr"], default="ocr",
                   help="ocr: the one character; dense_ocr: every line's key letter and digits")
    p.add_argument("--image-size", type=int, default=None, help="default 56 (ocr) / 112 (dense_ocr)")
    p.add_argument("--num-strings", type=int, default=4, help="dense_ocr: labelled lines per image")
    p.add_argument("--length", type=int, default=None, help="characters per string (default 1 (ocr) / 2 (dense_ocr))")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--save", default=None, help="write the trained ViT's state dict here (.pth)")
    a = p.parse_args()
    a.image_size = a.image_size or (56 if a.task == "ocr" else 112)
    a.length = a.length or (1 if a.task == "ocr" else 2)
    if a.steps < 0 or a.batch < 1 or a.length < 1 or not 1 <= a.num_strings <= 26:
        p.error("need --steps >= 0, --batch >= 1, --length >= 1 and --num-strings in 1..26")
    dev = torch.device(a.device)
    torch.manual_seed(0)
    tower, proc, rng = tiny_model().vision.train().to(dev), ImageProcessor(), random.Random(0)
    groups, names, sample = task_sampler(a, rng)

    def batch(n):
        recs = [sample() for _ in range(n)]
        ys = [torch.tensor([r[1][g] for r in recs], device=dev) for g in range(len(groups))]  # [n, slots] per group
        return [proc(r[0]).to(dev) for r in recs], ys

    tokens = tower(batch(1)[0]).shape   # [merged tokens of one image, D]
    head = torch.nn.Linear(tokens.numel(), sum(k * c for _, k, c in groups)).to(dev)
    opt = torch.optim.AdamW([*tower.parameters(), *head.parameters()], lr=a.lr)
    t0 = time.time()
    for step in range(a.steps + 1):
        xs, ys = batch(a.batch)
        out = head(tower(xs).reshape(a.batch, -1)).split([k * c for _, k, c in groups], dim=-1)
        logits = [o.reshape(a.batch, k, c) for o, (_, k, c) in zip(out, groups)]   # [batch, slots, classes]
        # every slot counts the same: the mean of the per-slot cross-entropies
        ce = [torch.nn.functional.cross_entropy(lg.transpose(1, 2), y, reduction="none") for lg, y in zip(logits, ys)]
        loss = torch.cat(ce, dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == a.steps:
            # each batch is freshly drawn and scored before its update: accuracy on images the tower never saw
            hits = torch.cat([(lg.argmax(-1) == y).float().mean(0) for lg, y in zip(logits, ys)]).tolist()
            acc = sum(hits) / len(hits)
            print(f"step {step}: loss {loss.item():.3f}, batch accuracy {acc:.1%} ({time.time() - t0:.0f} s)",
                  flush=True)
            if len(hits) > 1:
                print("  per slot: " + ", ".join(f"{n} {h:.0%}" for n, h in zip(names, hits)), flush=True)
    if a.save:
        torch.save(tower.vit.state_dict(), a.save)
        print(f"saved the ViT to {a.save} (vision.weights_file)")


if __name__ == "__main__":
    main()
