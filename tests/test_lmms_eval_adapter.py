"""The lmms-eval adapter (vlt.evaluation.lmms_eval_model, the ``lmms`` extra) run by lmms-eval itself.

Runs only where lmms-eval is installed (``pip install "vlt[lmms]"``): the whole module is skipped
otherwise, as in CI. A tiny export answers a local lmms-eval task (YAML + utils.py written here, its
dataset a JSON file of synthetic rows with PNG images: nothing is downloaded) through lmms-eval's
own evaluator, model name ``vlt`` found through the entry point. Checked: every answer is
``vlt eval``'s greedy answer for the same row cut at the task's stop string, and lmms-eval's
exact-match score is vlt's scoring of those answers (half the references are set to them, so the
score cannot be 0 by accident)."""
import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("lmms_eval")

from vlt.data.synthetic import generate_record, sample_rng  # noqa: E402
from vlt.evaluation.scoring import exact_match  # noqa: E402

MAX_NEW = 6
TASK_YAML = """task: vlt_synth
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new}
  until: {until}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""
TASK_UTILS = """from PIL import Image

from vlt.evaluation.scoring import exact_match


def doc_to_visual(doc):
    return [Image.open(p).convert("RGB") for p in doc["images"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"exact_match": exact_match(results[0], doc["answer"])}
"""


def _export(out, **decoder):
    """tests/test_evaluation.py's tiny export: tiny-hybrid (swa, gdn, linear, full layers unless ``decoder``
    says otherwise), weights scaled up so that answers depend on the image and text."""
    from vlt.checkpoint.export import save_pretrained_vlt
    from vlt.config import VLMConfig
    from vlt.model import VLM
    torch.manual_seed(0)
    model = VLM(VLMConfig.from_name("tiny-hybrid", decoder={"mrope_section": [4, 6, 6], "head_dim": 32,
                                                              "mixers": {"swa": {"window": 16}}, **decoder})).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "embed" not in name:
                p.mul_(3)
    return save_pretrained_vlt(model, out, tokenizer_dir="byte",
                               prompt={"system": "", "min_pixels": 56 * 56, "max_pixels": 56 * 56})


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return _export(tmp_path_factory.mktemp("lmms") / "export")


def _synthetic_rows(root, tasks=("color", "count", "multi_image") * 2):
    """Synthetic rows (colour, count, two-image questions) as a LLaVA JSONL with PNG files."""
    root.mkdir()
    rows = []
    for i, task in enumerate(tasks):
        rec = generate_record(task, sample_rng(0, "test", i))
        names = []
        for k, im in enumerate(rec.images):
            names.append(f"{i}_{k}.png")
            im.save(root / names[-1])
        rows.append({"id": str(i), "task": task, "images": names, "conversations": rec.conversations})
    (root / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def _vlt_eval(export, data, max_new: int) -> dict:
    """`vlt eval`'s predictions (by row id) for the rows of ``data``/eval.jsonl."""
    from vlt.cli import main
    out = data.parent / f"vlt_eval_{max_new}"
    assert main(["eval", "--ckpt", str(export), "--data", str(data / "eval.jsonl"), "--device", "cpu",
                 "--max-new-tokens", str(max_new), "--batch-size", "4", "--out", str(out), "--no-progress"]) == 0
    return {(p := json.loads(line))["id"]: p for line in (out / "predictions.jsonl").read_text().splitlines()}


def test_lmms_eval_runs_the_adapter_and_matches_vlt_eval(export, tmp_path, monkeypatch):
    from lmms_eval.evaluator import simple_evaluate
    from lmms_eval.tasks import TaskManager

    from vlt.data.tokenizer import ByteTokenizer
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))          # datasets' cache stays in tmp_path
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")               # and nothing may be fetched
    rows = _synthetic_rows(tmp_path / "data")
    vlt_tokens = {k: p["tokens"] for k, p in _vlt_eval(export, tmp_path / "data", MAX_NEW).items()}
    texts = {k: ByteTokenizer().decode(t) for k, t in vlt_tokens.items()}
    # two stop strings the answers contain: a letter or digit some answer emits as a token after its first (one
    # byte token: the adapter stops that row's decoding there) and two characters of another answer (several
    # tokens: only the text is cut)
    one = next(chr(t) for ts in vlt_tokens.values() for t in ts[1:] if t < 128 and chr(t).isalnum())
    two = next(t[1:3] for t in texts.values() if one not in t and len(t) >= 3)
    until = [one, two]
    expected = {k: t[:min([t.find(s) for s in until if s in t], default=len(t))].strip() for k, t in texts.items()}
    assert expected != {k: t.strip() for k, t in texts.items()} and set(expected.values()) != {""}, texts
    assert any(not any(s in t for s in until) for t in texts.values()), texts   # some answers are not cut

    # the lmms-eval dataset: the same rows and PNGs; half the references are the expected answers, so exact
    # match is >= 0.5; single-image questions lose their <image> placeholder (the adapter puts images first)
    data = []
    for r in rows:
        question = r["conversations"][0]["value"]
        if int(r["id"]) % 2 and len(r["images"]) == 1:
            question = question.replace("<image>\n", "")
        answer = expected[r["id"]] if int(r["id"]) < 3 else r["conversations"][1]["value"]
        data.append({"id": r["id"], "question": question, "answer": answer,
                     "images": [str(tmp_path / "data" / n) for n in r["images"]]})
    task_dir = tmp_path / "task"
    task_dir.mkdir()
    (task_dir / "rows.json").write_text("\n".join(json.dumps(d) for d in data) + "\n")
    (task_dir / "vlt_synth.yaml").write_text(TASK_YAML.format(data=task_dir / "rows.json", max_new=MAX_NEW,
                                                                until=json.dumps(until)))
    (task_dir / "utils.py").write_text(TASK_UTILS)

    out = simple_evaluate(model="vlt", model_args=f"ckpt={export},device=cpu,dtype=float32,batch_size=4",
                          tasks=["vlt_synth"], task_manager=TaskManager(include_path=str(task_dir),
                                                                        include_defaults=False),
                          log_samples=True, bootstrap_iters=0, process_docs_parallel=1)
    samples = out["samples"]["vlt_synth"]
    answers = {data[s["doc_id"]]["id"]: s["filtered_resps"][0] for s in samples}
    assert answers == expected                       # 6 rows in batches of 4: a full and a partial batch
    score = sum(exact_match(expected[d["id"]], d["answer"]) for d in data) / len(data)
    assert score >= 0.5
    assert out["results"]["vlt_synth"]["exact_match,none"] == pytest.approx(score, abs=1e-12)


def test_requests_of_different_settings_in_one_call_and_the_eager_fallback(tmp_path, caplog):
    """Requests of two max_new_tokens interleaved in one generate_until call come back in order, each
    equal to `vlt eval`'s answer at that length, for a model the engine refuses (a test mixer whose
    growing state it cannot hold): the adapter decodes it with the eager loop, as `vlt eval` does."""
    import growing_mixer  # noqa: F401  (registers test_growing_unsized)
    from lmms_eval.api.instance import Instance
    from PIL import Image

    from vlt.evaluation.lmms_eval_model import VltModel
    export = _export(tmp_path / "export", layout="[swa, test_growing_unsized]")
    rows = _synthetic_rows(tmp_path / "data", ("color", "count", "color"))
    want = {n: _vlt_eval(export, tmp_path / "data", n) for n in (2, 5)}
    lm = VltModel(ckpt=str(export), device="cpu", batch_size=2)
    docs = [{"images": [str(tmp_path / "data" / f) for f in r["images"]],
             "question": r["conversations"][0]["value"].replace("<image>\n", "")} for r in rows]
    lm.task_dict = {"synth": {"test": docs}}
    to_visual = lambda doc: [Image.open(p).convert("RGB") for p in doc["images"]]
    order = [(i, n) for i in range(len(docs)) for n in (5, 2)]
    requests = [Instance("generate_until", (docs[i]["question"], {"max_new_tokens": n}, to_visual, i, "synth", "test"),
                         0, {"task": "synth", "doc_id": i, "repeats": 1}) for i, n in order]
    with caplog.at_level("WARNING", logger="vlt"):
        answers = lm.generate_until(requests)
    assert "test_growing_unsized" in caplog.text and "eager path" in caplog.text
    assert answers == [want[n][rows[i]["id"]]["prediction"] for i, n in order]
    assert len(set(answers)) > 2


def test_model_args_and_requests_it_does_not_support(export):
    from lmms_eval.api.instance import Instance
    from lmms_eval.models import get_model

    from vlt.evaluation.lmms_eval_model import VltModel, decoding_from
    cls = get_model("vlt")
    assert cls is VltModel
    for args, message in [("", "ckpt is required"), (f"ckpt={export},dtype=int8", "dtype='int8'"),
                          (f"ckpt={export},device=tpu", "device='tpu'"),
                          (f"ckpt={export},batch_size=auto", "batch_size='auto'"),
                          (f"ckpt={export},batch_size=0", "batch_size=0"),
                          (f"ckpt={export},graphs=maybe", "graphs takes true or false"),
                          (f"ckpt={export},beams=2", r"unknown model arg\(s\) \['beams'\]"),
                          ("ckpt=/nonexistent/x", "not a directory")]:
        with pytest.raises(ValueError, match=message):
            cls.create_from_arg_string(args, {"batch_size": 1, "device": None})
    # lmms-eval always passes its own --batch_size; --model_args' value wins instead of a duplicate-key TypeError
    lm = cls.create_from_arg_string(f"ckpt={export},device=cpu,batch_size=3,graphs=false", {"batch_size": 1})
    assert lm.batch_size == 3 and lm.engine_kwargs == {"graphs": False}
    req = Instance("loglikelihood", ("ctx", "cont", None, 0, "t", "test"), 0, {"task": "t", "doc_id": 0, "repeats": 1})
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.loglikelihood([req])
    with pytest.raises(NotImplementedError, match="generate_until only"):
        lm.generate_until_multi_round([req])
    with pytest.raises(ValueError, match="num_beams=4"):
        decoding_from({"num_beams": 4})
    assert decoding_from({"until": "\n", "do_sample": False, "temperature": 0.7}) == decoding_from({"until": ["\n"]})


def test_vlt_imports_without_lmms_eval_and_the_adapter_says_how_to_install(monkeypatch):
    code = ("import sys, vlt, vlt.evaluation, vlt.cli; "
            "assert not [m for m in sys.modules if m.startswith('lmms_eval')], 'vlt imported lmms_eval'")
    subprocess.run([sys.executable, "-c", code], check=True)
    for name in [m for m in sys.modules if m == "lmms_eval" or m.startswith("lmms_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)          # as if the extra were not installed
    monkeypatch.setitem(sys.modules, "lmms_eval", None)
    monkeypatch.delitem(sys.modules, "vlt.evaluation.lmms_eval_model", raising=False)
    with pytest.raises(ImportError, match=r'pip install "vlt\[lmms\]"'):
        import vlt.evaluation.lmms_eval_model  # noqa: F401
    monkeypatch.delitem(sys.modules, "vlt.evaluation.lmms_eval_model", raising=False)
