"""A trainer over a tiny random model of any family, and a recorder of the LM head's outputs: for the tests that
compare generation paths."""

from __future__ import annotations

import torch


def family_trainer(family: str, tiny_setup: dict, root, num_heads: int = 2, num_kv_heads: int = 0):
    """A trainer (CPU) over a tiny random model of `family` trained on tiny_setup's data: K=3, 3 prompts, 10 new
    tokens (what the decode tests compare generation paths on); num_kv_heads < num_heads: grouped-query attention."""
    from dyme_core.config import InitModelConfig, load_config
    from dyme_core.models import init_tiny_model
    from dyme_core.trainer import DymeTrainer

    ds = tiny_setup["dataset"]
    texts = [t for s in ds.samples for t in (s.question, s.answer, s.hint or "") if t]
    init_tiny_model(InitModelConfig(family=family, out_dir=str(root / "model"), vocab_size=300, hidden_size=32,
                                    num_layers=2, num_heads=num_heads, num_kv_heads=num_kv_heads,
                                    vision_hidden_size=32, vision_layers=1,
                                    image_size=32, patch_size=8), texts)
    cfg = load_config(None, [
        f"data.path={tiny_setup['data']}", f"model.name_or_path={root / 'model'}", f"train.output_dir={root / 'run'}",
        "train.refined=", "train.template_pool=", "train.batch_size=3", "train.num_generations=3",
        "train.max_new_tokens=10", "train.progress_bar=false", "train.report_to=[jsonl]"])
    return DymeTrainer(cfg, ds, device="cpu")


class LogitsRecorder:
    """The LM head's last-position outputs at every forward: what each step's distribution is computed from."""

    def __init__(self, model: torch.nn.Module):
        self.calls: list[torch.Tensor] = []
        self._handle = model.get_output_embeddings().register_forward_hook(
            lambda _m, _i, out: self.calls.append(out[:, -1].detach().float().clone()))

    def __enter__(self) -> LogitsRecorder:
        return self

    def __exit__(self, *_: object) -> None:
        self._handle.remove()
