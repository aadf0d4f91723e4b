"""Where the reasoning chain breaks (issue 12): a base that transcribes a chart, and knows the arithmetic
when the table is given as text, still answers worse after memorising traces that chain the two.

For val questions of the miniature (``bench/chart_base.py``'s dataset), greedy decoding from a model
(the base, or a trained model folder), each probe forcing a different prefix of the rule-refined trace
(``refine.observe=all``) after the reasoning prompt:

1. ``transcribe``: the transcription prompt alone; share of the chart's cells read exactly;
2. ``observe``: prefix ``Goal: ...\\nObservation: The chart '<title>' shows`` -> the cells the model
   then states (read in the trace, as the memorised target asks);
3. ``derive``: the true Goal and Observation, then ``Reasoning: <operation>:`` -> the continuation
   equals the refiner's derivation (the arithmetic) exactly;
4. ``derive_text``: the pretraining text skill's own prompt (the table as text + the question) -> the
   derivation, exactly (what the base learnt);
5. ``chain``: prefix up to ``shows`` and free decoding to the answer line -> relaxed accuracy;
6. ``bare``: the plain reasoning prompt -> relaxed accuracy (what the gate and the table measure).

Run (CPU, a few minutes for the small base)::

    .venv/bin/python bench/trace_probe.py --model /tmp/cb2/small/base --data /tmp/cb2-work/data --n 120 \\
        --out bench/results/trace-probe/small.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dyme_core.config import ModelConfig  # noqa: E402
from dyme_core.data.charts import (  # noqa: E402
    TRANSCRIBE_QUESTION,
    parse_transcription,
    table_from_facts,
    transcription,
)
from dyme_core.data.ingest import open_dataset  # noqa: E402
from dyme_core.evaluate import generate_answers  # noqa: E402
from dyme_core.models import load_model, load_processor  # noqa: E402
from dyme_core.refiner import derivation, rule_refine  # noqa: E402
from dyme_core.rewards import accuracy_reward  # noqa: E402


def greedy_after(model, processor, images, questions, prefixes, max_new_tokens: int) -> list[str]:
    """Greedy continuations of the reasoning prompt + a forced start of the answer."""
    return generate_answers(model, processor, images, questions, max_new_tokens, "reason", prefixes=prefixes)


def sections(trace: str) -> dict[str, str]:
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in trace.splitlines() if ":" in line}


def forced_prefixes(trace: str) -> dict[str, str]:
    """The forced starts of the ``observe`` and ``derive`` probes, cut from the rule-refined ``trace``.

    Each ends on a word, never on a space: the tokenizer attaches a space to the word after it, so a prefix
    ending in a space ends on a lone-space token that training never shows, and the continuation derails.
    """
    t = sections(trace)
    head = t["Reasoning"].split(": ", 1)[0]
    return {"observe": f"Goal: {t['Goal']}\nObservation: {t['Observation'].split(' shows ')[0]} shows",
            "derive": f"Goal: {t['Goal']}\nObservation: {t['Observation']}\nReasoning: {head}:"}


def cells_read(text: str, rows: list) -> tuple[int, int]:
    got = parse_transcription(text.split("\n")[0].rstrip("."))
    return sum(got.get(str(label)) == str(v) for label, v in rows), len(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True, help="the miniature's materialised dataset folder")
    ap.add_argument("--n", type=int, default=120, help="val questions")
    ap.add_argument("--batch", type=int, default=40)
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cuda", "cpu"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    processor, model = load_processor(ModelConfig(name_or_path=args.model)), load_model(
        ModelConfig(name_or_path=args.model, dtype="float32"), torch.device(args.device))
    ds = open_dataset(args.data)
    val = ds.split("val")[: args.n]
    tally: dict[str, list[float]] = {k: [0, 0] for k in ("transcribe", "observe", "derive", "derive_text", "chain",
                                                         "bare")}
    by_type: dict[str, dict[str, list[int]]] = {}
    examples = []
    for start in range(0, len(val), args.batch):
        chunk = val[start: start + args.batch]
        images = [ds.load_image(s) for s in chunk]
        forced = [forced_prefixes(rule_refine(s, observe="all")) for s in chunk]
        shows = [f["observe"] for f in forced]
        derivs = [derivation(s) for s in chunk]
        tables = [transcription(table_from_facts(s.visual_facts)) for s in chunk]
        outs = {
            "transcribe": greedy_after(model, processor, images, [TRANSCRIBE_QUESTION] * len(chunk), [""] * len(chunk),
                                       64),
            "observe": greedy_after(model, processor, images, [s.question for s in chunk], shows, 64),
            "derive": greedy_after(model, processor, images, [s.question for s in chunk],
                                   [f["derive"] for f in forced], 48),
            "derive_text": greedy_after(model, processor, images,
                                        [f"{tb}. {s.question}" for tb, s in zip(tables, chunk, strict=True)],
                                        [""] * len(chunk), 48),
            "chain": greedy_after(model, processor, images, [s.question for s in chunk], shows, 128),
            "bare": greedy_after(model, processor, images, [s.question for s in chunk], [""] * len(chunk), 128),
        }
        for i, s in enumerate(chunk):
            rows = s.visual_facts["rows"]
            got = {}
            for probe in ("transcribe", "observe"):
                right, n = cells_read(outs[probe][i], rows)
                tally[probe][0] += right
                tally[probe][1] += n
                got[probe] = right / n
            for probe in ("derive", "derive_text"):
                ok = derivs[i] is not None and outs[probe][i].split("\n")[0].strip() == derivs[i]
                tally[probe][0] += ok
                tally[probe][1] += derivs[i] is not None
                got[probe] = float(ok)
            for probe in ("chain", "bare"):
                ok = accuracy_reward(outs[probe][i], s.references())
                tally[probe][0] += ok
                tally[probe][1] += 1
                got[probe] = float(ok)
            for probe, v in got.items():
                by_type.setdefault(s.qtype, {}).setdefault(probe, []).append(v)
            if len(examples) < 8:
                examples.append({"id": s.id, "question": s.question, "answer": s.answer, "derivation": derivs[i],
                                 **{k: outs[k][i] for k in outs}})
    summary = {k: round(a / b, 4) if b else None for k, (a, b) in tally.items()}
    result = {"model": args.model, "n": len(val), "summary": summary,
              "by_qtype": {q: {p: round(sum(v) / len(v), 3) for p, v in d.items()} for q, d in sorted(by_type.items())},
              "examples": examples}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps({"summary": summary, "by_qtype": result["by_qtype"]}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
