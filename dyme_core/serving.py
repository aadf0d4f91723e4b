"""The registered model, as MLflow "models from code" (DESIGN.md sections 5 and 7).

`dyme register` (dyme_core/tracking.py) logs this file as the pyfunc's `python_model`, the saved HF directory as
the artifact `model_dir` and the `dyme_core` package as `code_paths`; MLflow runs the file at log and at load
time (it ends with `mlflow.models.set_model`), so nothing is pickled and a model loads with any version of
this class's dependencies that its requirements allow. (`mlflow.transformers` cannot log image-text-to-text
models, hence a pyfunc.)

Input columns `image` (a file path, PNG/JPEG bytes or a base64 string) and `question`; params
`max_new_tokens` and `style` (reason | direct); output columns `completion` and `answer`, greedy, through the
same `inference.generate_answers` as `dyme evaluate`. Serving reaches only the generate path (inference,
families, models, generation, rewards, config), so the model's requirements are torch, transformers,
tokenizers, safetensors, pillow, pandas, numpy, pyyaml and mlflow, not the training stack.

Besides tracking.py, the one module of dyme_core that imports mlflow, since it is the MLflow model; no other
module imports it. Tests: tests/core/test_tracking.py (register, load by alias, predict; a fresh venv).
"""

from __future__ import annotations

import base64
import binascii
import io
from pathlib import Path
from typing import Any

import mlflow.models
import mlflow.pyfunc
import pandas as pd
import torch
from PIL import Image

from dyme_core.config import EvaluateConfig, ModelConfig
from dyme_core.inference import generate_answers
from dyme_core.models import load_model, load_processor
from dyme_core.rewards import parse_completion

PREDICT_BATCH_SIZE = 16  # rows per generate call (evaluate.batch_size's default)


def open_image(value: Any) -> Image.Image:
    """A PIL RGB image from a file path, raw image bytes or a base64 string."""
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
    elif isinstance(value, str) and len(value) < 4096 and Path(value).is_file():
        data = Path(value).read_bytes()
    elif isinstance(value, str):
        try:
            data = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(f"image is neither an existing file nor base64: {value[:80]!r}") from None
    else:
        raise ValueError(f"image must be a path, bytes or a base64 string, got {type(value).__name__}")
    return Image.open(io.BytesIO(data)).convert("RGB")


class DymeVLM(mlflow.pyfunc.PythonModel):
    """Pyfunc over a saved HF image-text-to-text directory (artifact `model_dir`): greedy answers."""

    def load_context(self, context: Any) -> None:
        cfg = ModelConfig(name_or_path=context.artifacts["model_dir"])
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.processor = load_processor(cfg)
        self.model = load_model(cfg, device).eval()

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        params = params or {}
        images = [open_image(v) for v in model_input["image"]]
        questions = [str(q) for q in model_input["question"]]
        completions: list[str] = []
        for lo in range(0, len(questions), PREDICT_BATCH_SIZE):
            completions += generate_answers(
                self.model,
                self.processor,
                images[lo : lo + PREDICT_BATCH_SIZE],
                questions[lo : lo + PREDICT_BATCH_SIZE],
                max_new_tokens=int(params.get("max_new_tokens", EvaluateConfig.max_new_tokens)),
                style=str(params.get("style", "reason")),
            )
        answers = [parse_completion(c).answer for c in completions]
        return pd.DataFrame({"completion": completions, "answer": answers})


mlflow.models.set_model(DymeVLM())
