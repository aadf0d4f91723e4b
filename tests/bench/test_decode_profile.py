"""bench/decode_step.py --profile: the CPU run writes a per-step breakdown whose categories add up, and a GPU trace
(built by hand here, as torch's profiler links CUDA kernels to their launches) is attributed to decode steps,
categorised, and a graph replay without kernels is reported, not fatal."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from torch.autograd import DeviceType
from torch.autograd.profiler_util import Interval

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repo root, for `bench`

from bench import decode_step as ds  # noqa: E402
from bench.common import Work  # noqa: E402


def test_profile_on_the_cpu_writes_ops_per_step_and_categories_that_sum_to_the_total(
    bench_work: Work, tmp_path: Path, one_thread: None
) -> None:
    out = tmp_path / "out"
    argv = "--device cpu --shape tiny --prompts 2 --k 2 --new-tokens 4 --repeats 1 --methods complete --samples 8"
    ds.main([*argv.split(), "--work", str(bench_work.data_dir.parent), "--out", str(out), "--profile"])
    res = json.loads((out / "decode-profile-tiny.json").read_text())
    eager = res["parts"]["eager"]
    assert eager["status"] == "ok" and eager["steps"] == ds.PROFILE_STEPS and eager["unit"] == "aten ops"
    assert eager["kernels_per_step"] > 0
    assert sum(eager["categories_ms"].values()) == pytest.approx(eager["time_ms_per_step"])
    for category in (
        "matmul/GEMM",
        "attention",
        "normalisation",
        "elementwise/activation",
        "sampling",
        "copies/cache writes",
    ):
        assert eager["categories_ms"][category] > 0, category  # each has work in a decode step of this model
    assert 0 < eager["busy_share"] <= 1
    top = {k["name"]: k["category"] for k in eager["top"]}
    assert (top["aten::mm"], top["aten::exponential_"]) == ("matmul/GEMM", "sampling")  # the draw is outside the model
    assert len(eager["top"]) == 15 and eager["top"][0]["ms_per_step"] >= eager["top"][-1]["ms_per_step"]
    for part in ("captured", "compiled"):
        assert res["parts"][part]["status"].startswith("skipped")  # no CUDA graph on the CPU
    md = (out / "decode-profile-tiny.md").read_text()
    assert "| matmul/GEMM |" in md and "Captured step" in md


@dataclass(eq=False)
class Event:
    """The fields of torch's FunctionEvent that the profile reads."""

    name: str
    start: float
    end: float
    device_type: DeviceType = DeviceType.CPU
    id: int = 0
    cpu_parent: Event | None = None
    self_cpu_time_total: float = 0.0

    @property
    def time_range(self) -> Interval:
        return Interval(self.start, self.end)


# one decode step's kernels: (launching op, ranges it ran in, kernel name, expected category)
STEP = [
    ("aten::mm", "model", "sm90_xmma_gemm_bf16bf16_bf16f32", "matmul/GEMM"),
    ("aten::pow", "norm", "vectorized_elementwise_kernel<pow_tensor_scalar>", "normalisation"),
    ("aten::_scaled_dot_product_flash_attention", "model", "pytorch_flash::flash_fwd_kernel", "attention"),
    ("aten::index_copy_", "model", "index_copy_kernel_impl", "copies/cache writes"),
    ("aten::silu", "model", "vectorized_elementwise_kernel<silu>", "elementwise/activation"),
    ("aten::exponential_", "step", "distribution_elementwise_grid_stride_kernel", "sampling"),
]


def eager_trace(steps: int) -> list[Event]:
    """`steps` eager decode steps: each op launches one kernel (1 us, launched 2 us apart: the GPU is idle half the
    time) from inside the labelled ranges, as the profiler links them: kernel id == its cudaLaunchKernel's id."""
    events, corr, t = [], 100, 0.0
    for _ in range(steps):
        step = Event(ds.STEP_RANGE, t, t + 20)
        model = Event(ds.MODEL_RANGE, t + 0.5, t + 15, cpu_parent=step)
        norm = Event(ds.NORM_RANGE, t + 2, t + 4, cpu_parent=model)
        events += [step, model, norm]
        for i, (op_name, where, kernel, _) in enumerate(STEP):
            parent = {"model": model, "norm": norm, "step": step}[where]
            op = Event(op_name, t + 1 + 2 * i, t + 1.8 + 2 * i, cpu_parent=parent)
            launch = Event("cudaLaunchKernel", op.start + 0.1, op.start + 0.5, id=corr, cpu_parent=op)
            events += [
                op,
                launch,
                Event(kernel, 1000 + t + 2 * i, 1001 + t + 2 * i, device_type=DeviceType.CUDA, id=corr),
            ]
            corr += 1
        t += 20
    return events


def graph_trace(steps: int, with_kernels: bool = True) -> list[Event]:
    """`steps` graph replays: one cudaGraphLaunch per decode_step range, all of the step's kernels sharing its
    correlation id, back to back (the GPU busy the whole span)."""
    events, t = [], 0.0
    for s in range(steps):
        step = Event(ds.STEP_RANGE, t, t + 1)
        events += [step, Event("cudaGraphLaunch", t + 0.1, t + 0.5, id=500 + s, cpu_parent=step)]
        if with_kernels:
            events += [
                Event(kernel, 2000 + 10 * s + i, 2001 + 10 * s + i, device_type=DeviceType.CUDA, id=500 + s)
                for i, (_, _, kernel, _) in enumerate(STEP)
            ]
        t += 1
    return events


def test_a_gpu_trace_is_attributed_to_decode_steps_and_the_graph_replay_takes_the_eager_categories() -> None:
    eager, sequence = ds.profile_summary(eager_trace(3), on_gpu=True)
    assert (eager["steps"], eager["kernels_per_step"]) == (3, len(STEP))
    assert sequence == [cat for *_, cat in STEP]
    assert eager["categories_ms"] == pytest.approx(
        {c: sum(cat == c for *_, cat in STEP) / 1e3 for c in ds.CATEGORIES}
    )  # 1 us per kernel
    assert eager["time_ms_per_step"] == pytest.approx(len(STEP) / 1e3)
    assert eager["busy_share"] == pytest.approx(18 / 51)  # 3 x 6 us of kernels over 51 us from first to last
    replay, _ = ds.profile_summary(graph_trace(3), on_gpu=True, reference=sequence)
    assert (
        replay["kernels_per_step"] == len(STEP) and replay["categories_from"] == "the eager step's kernels, by position"
    )
    assert replay["categories_ms"] == pytest.approx(eager["categories_ms"])  # pow is normalisation, not elementwise
    assert replay["busy_share"] == pytest.approx(18 / 26)
    # without the eager step's order, a replay's kernels are categorised by name: no normalisation then
    by_name, _ = ds.profile_summary(graph_trace(3), on_gpu=True)
    assert by_name["categories_ms"]["normalisation"] == 0 and by_name["categories_ms"]["sampling"] > 0


def test_a_graph_replay_whose_kernels_cupti_does_not_show_is_recorded_not_fatal() -> None:
    replay, sequence = ds.profile_summary(graph_trace(3, with_kernels=False), on_gpu=True, reference=["other"])
    assert (replay["status"], replay["steps"], replay["kernels_per_step"], sequence) == ("ok", 3, 0, [])
    assert "CUPTI reported no kernels" in replay["note"]
    replay["busy_share_estimate"] = 0.9  # the eager step's kernel time over the timed captured step
    meta = {"shape": "tiny", "rows": 4, "device_name": "GPU", "torch": "2", "transformers": "5", "date": "today"}
    md = ds.profile_markdown({"meta": meta, "profile_steps": 3, "parts": {"captured": replay}})
    assert "= 90%" in md
    assert "CUPTI reported no kernels" in md


@pytest.mark.parametrize(
    ("name", "context", "expected"),
    [
        # a cuBLAS GEMM launched by the LM head's linear
        ("aten::mm nvjet_tst_128x64_64x4_1x2_h_bz_TNT", frozenset({"decode_step", "model_forward"}), "matmul/GEMM"),
        # a cast inside RMSNorm is normalisation, though by name a copy
        ("aten::copy_ elementwise_kernel<copy>", frozenset({"decode_step", "model_forward", "norm"}), "normalisation"),
        # the KV cache write
        ("aten::index_copy_", frozenset({"decode_step", "model_forward"}), "copies/cache writes"),
        # the draw, outside the forward; and writing the token into the output, outside too
        ("aten::exponential_", frozenset({"decode_step"}), "sampling"),
        ("aten::index_copy_", frozenset({"decode_step"}), "copies/cache writes"),
        # a graph replay's kernels carry no ranges: names alone
        ("cunn_SoftMaxForward", None, "sampling"),
        ("void at::native::reduce_kernel<MeanOps>", None, "elementwise/activation"),
        ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", None, "attention"),
        ("Memcpy DtoD (Device -> Device)", None, "copies/cache writes"),
        # torch.compile's fused kernels in a compiled step's replay: an RMSNorm (its cast is no copy), a fused add
        ("triton_red_fused__to_copy_add_mean_mul_pow_rsqrt_1", None, "normalisation"),
        ("triton_poi_fused_add_mul_silu_3", None, "elementwise/activation"),
        ("aten::as_strided", frozenset({"decode_step", "model_forward"}), "other"),
    ],
)
def test_categories_of_kernels_and_ops(name: str, context: frozenset[str] | None, expected: str) -> None:
    assert ds.categorize(name, context) == expected
