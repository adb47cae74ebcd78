"""bench.py: the benchmark runs and refuses what it cannot run."""

import json
import subprocess
import sys

import pytest
import torch

import todre
from conftest import (
    HERE,
)


def test_bench_tiny_preset_runs_and_writes_its_json(tmp_path):
    out = tmp_path / "bench.json"
    argv = ["--preset", "tiny", "--repeats", "1", "--new-tokens", "4", "--json", str(out)]
    done = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["preset"], result["device"], result["dtype"]) == ("tiny", "cpu", "bfloat16")  # generate.py's default
    runs = {r["name"]: r for r in result["runs"]}
    assert list(runs) == ["full", "stage1-0.10", "todre-0.25", "todre-0.10", "hf-full"]
    assert [runs[n]["visual_tokens"] for n in runs] == [2928, 288, 720, 288, 2928]
    fields = {
        "name",
        "vision_s",
        "select_s",
        "prefill_s",
        "decode_s",
        "total_s",
        "prefill_tflops",
        "prefill_tflops_exact",
        "peak_mem_mb",
        "visual_tokens",
        "kv_cache_mb",
        "decode_tflops",
    }
    assert all(set(r) >= fields for r in runs.values())
    assert runs["todre-0.10"]["evict_layer"] == 1 and runs["stage1-0.10"]["evict_layer"] is None
    assert runs["todre-0.10"]["kv_cache_mb"] < runs["stage1-0.10"]["kv_cache_mb"] < runs["full"]["kv_cache_mb"]
    assert runs["full"]["kv_cache_mb"] == pytest.approx(runs["hf-full"]["kv_cache_mb"], rel=0.02)
    assert runs["full"]["prefill_tflops"] > runs["stage1-0.10"]["prefill_tflops"] > runs["todre-0.10"]["prefill_tflops"]
    assert runs["todre-0.10"]["stage2_probe"]["layers"] == [1, 2] and runs["todre-0.10"]["stage2_probe"]["probe_s"] > 0
    assert "Stage 2 forced after layer 1" in done.stdout and "Stage-1 selection in todre-0.10" in done.stdout


@pytest.mark.parametrize("configs, message", [("todre-64", "write todre-keep-64"), ("bogus", "unknown configuration")])
def test_bench_refuses_unknown_configurations_before_running_any(configs, message):
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--configs", configs], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "0"], "--batch-size must be an integer in [1, inf), got 0"),
        (["--repeats", "0"], "--repeats must be an integer in [1, inf)"),
        (["--anew", "-1"], "--anew must be an integer in [0, inf)"),
        (["--preset", "huge"], "invalid choice: 'huge'"),
        (["--json", "no/such/folder/out.json"], "--json no/such/folder/out.json: no such folder"),
    ],
)
def test_bench_says_what_is_wrong_with_a_flag_in_one_line(argv, message, tmp_path):
    done = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path
    )
    assert done.returncode == 2 and done.stderr.startswith("error: ") and message in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not done.stdout


def test_bench_qwen_preset_reports_the_same_fields(tmp_path):
    """A Qwen2.5-VL-shaped preset: 576 merged tokens for the 672x672 image at native resolution, the
    same JSON fields, Stage 1's budgets and Stage 2's eviction; transformers' run is LLaVA-NeXT's."""
    out = tmp_path / "bench.json"
    argv = ["--preset", "qwen-tiny", "--repeats", "1", "--warmup", "0", "--new-tokens", "3", "--json", str(out)]
    argv += ["--configs", "full,todre-0.10"]
    done = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    runs = {r["name"]: r for r in json.loads(out.read_text())["runs"]}
    assert [runs[n]["visual_tokens"] for n in ("full", "todre-0.10")] == [576, 58]
    assert runs["todre-0.10"]["evict_layer"] == 1 and runs["todre-0.10"]["kv_cache_mb"] < runs["full"]["kv_cache_mb"]
    assert all(
        {"prefill_s", "decode_s", "total_s", "prefill_tflops_exact", "peak_mem_mb"} <= set(r) for r in runs.values()
    )
    refused = subprocess.run(
        [sys.executable, str(HERE / "bench.py"), "--preset", "qwen-tiny", "--configs", "full,hf-full"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert refused.returncode == 2 and "hf-full runs transformers' LLaVA-NeXT" in refused.stderr


def test_bench_reuse_times_both_paths_and_their_answers_are_the_same_in_float32(tmp_path):
    """--reuse --batch-size: per-question times of one encode per image, of the prefix + batch path
    and of encoding anew, and in float32 every answer the same all three ways."""
    out = tmp_path / "reuse.json"
    argv = [
        "--preset",
        "tiny",
        "--batch-size",
        "4",
        "--images",
        "2",
        "--questions",
        "5",
        "--anew",
        "2",
    ]  # implies --reuse
    argv += ["--new-tokens", "3", "--dtype", "float32", "--configs", "full,todre-0.10", "--json", str(out)]
    done = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert (result["batch_size"], result["questions_per_image"], result["dtype"]) == (4, 5, "float32")
    for run in result["runs"]:
        assert run["reuse_s_per_question"] > 0 and run["batched_s_per_question"] > 0 and run["anew_s_per_question"] > 0
        assert run["batched_ratio"] == pytest.approx(run["batched_s_per_question"] / run["reuse_s_per_question"])
        assert run["batched_samples_per_s"] == pytest.approx(1 / run["batched_s_per_question"])
        assert (run["batched_same_answers"], run["anew_same_answers"], run["same_answers"]) == ("10/10", "4/4", True)
        assert "batched_differ_at_ties" not in run
    assert [r["name"] for r in result["runs"]] == ["full", "todre-0.10"]


@torch.inference_mode()
def test_rounding_ties_tells_a_tie_from_an_agreement_and_from_a_broken_batch(tmp_path, monkeypatch):
    """bench.rounding_ties, which explains bfloat16 answers that differ between the batched path and
    one question at a time: a question whose answers agree is not a tie; one that differs parts
    where its best two logits were within the paths' rounding difference, a few rounding steps; a
    batch computed with other settings (a broken batch) is many steps away."""
    import bench
    from evaluation import batched

    model = bench.build_model(bench.model_config("tiny"), torch.device("cpu"), torch.bfloat16, seed=0)
    questions = bench.synthetic_questions(tmp_path, 1, 8)
    args = bench.parse_args(["--preset", "tiny", "--reuse", "--batch-size", "4", "--new-tokens", "4"])
    settings = bench.settings_for("todre-0.25", args.evict_layer)
    verdicts = dict(zip([q.question_id for q in questions], bench.rounding_ties(
        model, questions, {q.question_id for q in questions}, settings, args
    ), strict=True))  # fmt: skip
    agree = [v for v in verdicts.values() if v == (False, 0.0)]
    differ = [v for v in verdicts.values() if v != (False, 0.0)]
    assert agree and differ, verdicts  # both kinds occur on these random weights
    assert all(tie and steps <= 8 for tie, steps in differ)

    answer_batch = batched.answer_batch
    monkeypatch.setattr(batched, "answer_batch", lambda m, c, p, prefix, s, *a, **k: answer_batch(
        m, c, p, prefix, todre.NO_PRUNING, *a, **k
    ))  # fmt: skip
    broken = bench.rounding_ties(model, questions, {q.question_id for q in questions}, settings, args)
    assert max(steps for _, steps in broken) > 50
