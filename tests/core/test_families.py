"""Every supported model family (idefics3, llava_onevision, qwen2_vl, qwen2_5_vl) through the one adapter seam of
`dyme_core/families.py`: a tiny random model built by init-model reloads with the Auto classes, DyME steps move
its language-model weights (frozen vision tower untouched), a row's log-probs do not depend on the padding of the
batch it sits in, evaluation runs, LoRA trains, and the registered pyfunc's load_context/predict answer."""

from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForImageTextToText, AutoProcessor

from dyme_core.config import InitModelConfig, load_config
from dyme_core.families import FAMILIES, family_of, get_family
from dyme_core.models import ANSWER_FLAG, VISION_MODULE_NAMES, init_tiny_model
from dyme_core.trainer import DymeTrainer, Row

pytestmark = pytest.mark.slow

MODEL_CLASSES = {
    "idefics3": "Idefics3ForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def family_model(request: pytest.FixtureRequest, tiny_setup: dict, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A tiny random model of one family, its tokenizer trained on the tiny dataset's text."""
    from dyme_core.refiner import rule_refine

    ds = tiny_setup["dataset"]
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "", rule_refine(s)) if t]
    out = tmp_path_factory.mktemp(request.param) / "model"
    init_tiny_model(InitModelConfig(family=request.param, out_dir=str(out), vocab_size=300, hidden_size=32,
                                    num_layers=1, num_heads=2, vision_hidden_size=32, vision_layers=1,
                                    image_size=32, patch_size=8), texts)
    return {"family": request.param, "model": out, "data": tiny_setup["data"], "dataset": ds}


def _cfg(fm: dict, out: Path, *extra: str):
    return load_config(None, [
        f"data.path={fm['data']}", f"model.name_or_path={fm['model']}", f"train.output_dir={out}",
        "train.refined=", "train.template_pool=", f"train.refine_cache_dir={out}/refine_cache",
        "train.max_steps=2", "train.batch_size=2", "train.num_generations=2", "train.max_new_tokens=8",
        "train.progress_bar=false", "train.learning_rate=1e-3", "train.report_to=[jsonl]", *extra,
    ])


def test_init_model_reloads_with_the_auto_classes(family_model: dict) -> None:
    model = AutoModelForImageTextToText.from_pretrained(family_model["model"])
    processor = AutoProcessor.from_pretrained(family_model["model"])
    assert type(model).__name__ == MODEL_CLASSES[family_model["family"]]
    assert family_of(model.config) is get_family(family_model["family"])
    # the saved chat template and the eos the trainer stops on survive the round trip
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "q"}]}],
        add_generation_prompt=True, tokenize=False)
    assert prompt.endswith(("Assistant:", "<|im_start|>assistant\n"))
    assert processor.tokenizer.eos_token == get_family(family_model["family"]).eos_token


def test_dyme_steps_move_the_language_model_only(family_model: dict, tmp_path: Path) -> None:
    cfg = _cfg(family_model, tmp_path)
    before = load_file(Path(family_model["model"]) / "model.safetensors")
    m = DymeTrainer(cfg, family_model["dataset"], device="cpu").train()
    assert m["step"] == 2 and m["rows/kept"] >= 1
    after = load_file(tmp_path / "model" / "model.safetensors")
    assert before.keys() == after.keys()
    moved = [k for k in before if not torch.equal(before[k], after[k])]
    decoder = [k for k in moved if ".layers." in k and not any(v in k for v in VISION_MODULE_NAMES)]
    assert decoder, f"no language-model weight changed: {moved[:5]}"
    # the projector/connector may train; the encoder blocks of the vision tower never do
    vision_blocks = [k for k in moved if any(v in k for v in VISION_MODULE_NAMES) and "merger" not in k]
    assert not vision_blocks, vision_blocks[:3]


def test_a_rows_logps_do_not_depend_on_the_batch_padding(family_model: dict, tmp_path: Path) -> None:
    trainer = DymeTrainer(_cfg(family_model, tmp_path, "train.max_new_tokens=12", "train.num_generations=3"),
                          family_model["dataset"], device="cpu")
    # prompts of different lengths, so that rows are left-padded by different amounts
    samples = sorted(trainer.samples, key=lambda s: len(s.question))
    batch = trainer._prepare([samples[0], samples[-1], samples[len(samples) // 2]])
    assert len({len(p) for p in batch.prompt_ids}) > 1
    torch.manual_seed(0)
    completions = trainer._generate(batch)
    assert len(completions) == 9
    target = trainer._encode_target(f"The largest bar is 12.\n{ANSWER_FLAG} 12")
    rows = [Row(1, completions[4], 1.0, 0.7), Row(0, completions[0], -1.0, 0.7), Row(2, target, 1.0, 1.0, True),
            Row(0, completions[2], 0.5, 0.7)]
    trainer.model.eval()  # no dropout: the same row must give the same numbers
    with torch.no_grad():
        together, mask = trainer._token_logps(trainer.model, batch, rows)
        for i, row in enumerate(rows):
            alone, alone_mask = trainer._token_logps(trainer.model, batch, [row])
            n = int(alone_mask.sum())
            assert int(mask[i].sum()) == n == len(row.completion)
            torch.testing.assert_close(together[i][mask[i]], alone[0][alone_mask[0]], rtol=1e-4, atol=1e-4)


def test_evaluate_runs(family_model: dict, tmp_path: Path) -> None:
    from dyme_core.evaluate import evaluate

    cfg = _cfg(family_model, tmp_path, f"evaluate.model_path={family_model['model']}",
               f"evaluate.out_dir={tmp_path / 'eval'}", "evaluate.limit=3", "evaluate.max_new_tokens=6",
               "evaluate.batch_size=2")
    metrics = evaluate(cfg, family_model["dataset"])
    assert metrics["n"] == 3 and 0.0 <= metrics["relaxed_accuracy"] <= 1.0
    lines = (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 3


def test_lora_trains(family_model: dict, tmp_path: Path) -> None:
    cfg = _cfg(family_model, tmp_path, "model.lora_r=4", "train.max_steps=1", "train.learning_rate=1e-2")
    trainer = DymeTrainer(cfg, family_model["dataset"], device="cpu")
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    lora_b = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    trainer.train_step()
    assert any(not torch.equal(p, lora_b[n]) for n, p in trainer.model.named_parameters() if n in lora_b)
    trainer.train()  # step 1 of 1 is done: saves
    # the saved model is a plain HF directory with the adapters merged in
    base = load_file(Path(family_model["model"]) / "model.safetensors")
    merged = load_file(tmp_path / "model" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    assert any(not torch.equal(base[k], merged[k]) for k in base if "q_proj" in k)


def test_pyfunc_predicts(family_model: dict) -> None:
    from types import SimpleNamespace

    from dyme_core.serving import DymeVLM

    ds = family_model["dataset"]
    samples = ds.split("test")[:2]
    pyfunc = DymeVLM()
    pyfunc.load_context(SimpleNamespace(artifacts={"model_dir": str(family_model["model"])}))
    frame = pd.DataFrame({"image": [str(ds.image_path(s)) for s in samples], "question": [s.question for s in samples]})
    out = pyfunc.predict(None, frame, {"max_new_tokens": 5})
    assert list(out.columns) == ["completion", "answer"] and len(out) == 2
    assert all(isinstance(c, str) for c in out["completion"])


def test_dyme_init_model_builds_the_configured_family(tiny_setup: dict, tmp_path: Path) -> None:
    """`dyme ingest` then `dyme init-model init_model.family=qwen2_5_vl`: the saved directory reloads through the
    Auto classes in a fresh process that imports only the family module (it registers the image-text processor)."""
    import subprocess
    import sys

    from dyme_core.cli import main

    common = [f"data.path={tiny_setup['data']}", f"data.out_dir={tmp_path / 'dataset'}",
              f"data.report={tmp_path / 'ingest.json'}"]
    assert main(["ingest", *common]) == 0
    out = tmp_path / "model"
    assert main(["init-model", *common, "init_model.family=qwen2_5_vl", f"init_model.out_dir={out}",
                 "init_model.vocab_size=300", "init_model.hidden_size=32", "init_model.num_layers=1",
                 "init_model.num_heads=2", "init_model.vision_hidden_size=32", "init_model.vision_layers=1",
                 "init_model.image_size=32"]) == 0
    code = ("import sys, dyme_core.families; from transformers import AutoModelForImageTextToText, AutoProcessor; "
            "m = AutoModelForImageTextToText.from_pretrained(sys.argv[1]); "
            "p = AutoProcessor.from_pretrained(sys.argv[1]); "
            "print(type(m).__name__, type(p).__name__, type(p.image_processor).__name__)")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLImageTextProcessor",
                                   "Qwen2VLImageProcessorPil"]


def test_qwen2_vl_refuses_a_vision_mlp_its_config_cannot_hold() -> None:
    """Qwen2-VL's vision config takes an integer MLP ratio: a width that is not a multiple is named in one line."""
    cfg = InitModelConfig(family="qwen2_vl", vision_hidden_size=32, vision_intermediate_size=100)
    with pytest.raises(ValueError, match="vision_intermediate_size=100 must be a multiple of .*vision_hidden_size=32"):
        get_family("qwen2_vl").build_tiny(cfg, tokenizer=None)
