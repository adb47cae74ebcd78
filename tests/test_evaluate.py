"""evaluate.py: the runner end to end on a tiny checkpoint. All 8 benchmarks of Table 1 in one run,
one encode per image with the same answers as without reuse, resume that cannot mix settings,
LLaVA-format answer files both ways, torchrun, and clear errors. Scorers are tested in
test_scoring.py, the data layouts in test_benchmarks.py."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

import bench
import evaluate
import generate
import model
import todre
from conftest import HERE, SHORT, fake_hub, make_hub_copies, make_llava_eval, noise_image
from evaluation import configs, runner, scoring, tables


@pytest.fixture(scope="module")
def llava_eval(tmp_path_factory):
    return make_llava_eval(tmp_path_factory.mktemp("data"))


def make_pope(root: Path, questions: int = 4) -> tuple[Path, Path]:
    """POPE's layout: three JSON Lines files numbering their questions from 1, COCO-named images."""
    images, data = root / "val2014", root / "pope"
    images.mkdir(parents=True)
    data.mkdir()
    for i in range(3):
        noise_image(160 + 40 * i, 120, seed=i).save(images / f"COCO_val2014_{i:012d}.jpg")
    for category in ("random", "popular", "adversarial"):
        lines = [
            {
                "question_id": q,
                "image": f"COCO_val2014_{(q - 1) % 3:012d}.jpg",
                "text": "Is there a dog in the image?",
                "label": "yes" if q % 2 else "no",
            }
            for q in range(1, questions + 1)
        ]
        (data / f"coco_pope_{category}.json").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return data, images


def pope(data: Path, images: Path) -> list[str]:
    """The command line's POPE part for make_pope's folders."""
    return ["--benchmark", "pope", "--data", str(data), "--images", str(images)]


def run(capsys, ckpt, *argv, max_new_tokens="4", dtype="float32"):
    flags = ["--model", str(ckpt.directory), "--device", "cpu", "--dtype", dtype, "--max-new-tokens", max_new_tokens]
    code = evaluate.main([*argv, *flags])
    out, err = capsys.readouterr()
    return code, out, err


def comparable(result: dict) -> dict:
    """results.json without what depends on the clock and the process (timings, memory, and which
    answers of a batched run were also timed alone)."""
    timing = ("samples_per_s", "samples_per_s_alone", "seconds", "seconds_alone", "seconds_alone_all")
    for row in result["configs"].values():
        for key in (*timing, "seconds_alone_measured", "peak_memory_mb"):
            row.pop(key)
    return result


def predictions(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "predictions.jsonl").read_text().splitlines()]


def test_configuration_names_parse_to_the_same_settings_as_bench(tmp_path):
    args = evaluate.parse_args(["--benchmark", "pope", "--data", str(tmp_path)])
    for name in ("full", "stage2", "stage1-0.25", "todre-0.10", "todre-0.10-v2", "cls-0.10", "keep-64"):
        settings = evaluate.settings_for(name, args)
        assert settings == configs.parse_config(name)
        expected = replace(settings, evict_layer=7) if settings.tau > 0 else settings
        assert bench.settings_for(name, 7) == expected  # bench forces Stage 2 on random weights, nothing else
    tuned = evaluate.parse_args(["--benchmark", "pope", "--data", str(tmp_path), "--tau", "0.05", "--newlines", "keep"])
    assert evaluate.settings_for("todre-0.10", tuned) == todre.Settings(retain=0.10, tau=0.05, newlines="keep")
    assert evaluate.settings_for("stage1-0.10", tuned).tau == 0.0  # --tau does not switch Stage 2 on
    assert evaluate.settings_for("full", tuned) == todre.NO_PRUNING
    assert evaluate.parse_args(["--benchmark", "table1", "--data", str(tmp_path)]).benchmarks == [
        "mme",
        "sqa",
        "gqa",
        "pope",
        "mmbench",
        "mmbench_cn",
        "vizwiz",
        "vqav2",
    ]
    assert evaluate.parse_args(["--benchmark", "table4,pope", "--data", str(tmp_path)]).benchmarks == [
        "mme",
        "sqa",
        "gqa",
        "pope",
    ]


# ---------------------------------------------------------------------------------------------
# Table 1 in one run
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def table1(mha, llava_eval, tmp_path_factory):
    """One run of all 8 benchmarks under full and todre-0.10, as a user would start it."""
    out = tmp_path_factory.mktemp("table1") / "out"
    argv = ["--benchmark", "table1", "--data", str(llava_eval), "--configs", "full,todre-0.10", "--out", str(out)]
    code = evaluate.main(
        [*argv, "--model", str(mha.directory), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "6"]
    )
    assert code == 0
    return out


def test_table1_writes_every_benchmarks_results_and_the_papers_table(table1, mha):
    table = json.loads((table1 / "table.json").read_text())
    assert table["columns"] == ["MME", "ScienceQA", "GQA", "POPE", "MMBench", "MMBench-CN", "VizWiz", "VQAv2"]
    scores = {}
    for name, column in zip(
        ["mme", "sqa", "gqa", "pope", "mmbench", "mmbench_cn", "vizwiz", "vqav2"], table["columns"], strict=True
    ):
        result = json.loads((table1 / name / "results.json").read_text())
        assert result["column"] == column and set(result["configs"]) == {"full", "todre-0.10"}
        for config, row in result["configs"].items():
            scores.setdefault(config, {})[column] = row["score"]
            assert row["score"] == row["metrics"].get("column")  # the column is the benchmark's own number
            assert row["missing"] == 0 and row["mean_new_tokens"] > 0
    assert scores["full"]["VizWiz"] is None and scores["full"]["VQAv2"] is None  # test splits: EvalAI scores them
    assert table == tables.build(scores, table["columns"], {r["config"]: r["total_seconds"] for r in table["rows"]})
    assert (table1 / "table.md").read_text().startswith("| config | total time | MME | ScienceQA | GQA | POPE |")


def test_every_answer_is_rescored_from_its_text_by_the_benchmarks_own_reader(table1, llava_eval):
    from evaluation.benchmarks import BENCHMARKS, load_questions

    for name in ("mme", "sqa", "gqa", "pope", "mmbench"):
        bench_ = BENCHMARKS[name]
        questions = load_questions(bench_, llava_eval, None, None)
        result = json.loads((table1 / name / "results.json").read_text())
        stored = predictions(table1 / name / "full")
        records = evaluate.scored_records(bench_, questions, stored, "llava")
        assert result["configs"]["full"]["metrics"] == json.loads(json.dumps(bench_.metrics(records)))


def test_prompts_are_llavas_vicuna_v1_conversation(table1):
    record = predictions(table1 / "pope" / "full")[0]
    assert record["prompt"] == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs there a dog in the image?"
        + SHORT
        + " ASSISTANT:"
    )
    text_only = {r["question_id"]: r for r in predictions(table1 / "sqa" / "full")}["26"]
    assert text_only["visual_tokens"] == 0 and "<image>" not in text_only["prompt"]  # ScienceQA: no image, none sent
    for r in predictions(table1 / "pope" / "todre-0.10"):
        assert set(r) >= {
            "question_id",
            "category",
            "image",
            "question",
            "prompt",
            "answer",
            "visual_tokens",
            "evict_layer",
            "new_tokens",
            "seconds",
            "seconds_alone",
            "prefill_tflops",
            "peak_memory_mb",
        }
        assert r["answer"] == r["answer"].strip() and 0 < r["seconds"]
        assert r["seconds_alone"] is None or r["seconds"] <= r["seconds_alone"]  # batched: a sample is timed alone


def test_answers_files_are_in_llavas_format_and_score_to_the_same_results(table1, llava_eval, tmp_path, capsys):
    lines = [json.loads(x) for x in (table1 / "sqa" / "full" / "answers.jsonl").read_text().splitlines()]
    assert [line["question_id"] for line in lines] == ["11", "26", "5"]
    assert set(lines[0]) == {"question_id", "prompt", "text", "answer_id", "model_id", "metadata"}
    assert lines[0]["prompt"].startswith("<image>\n") and not lines[1]["prompt"].startswith("<image>")  # IMG marker
    mmbench = json.loads((table1 / "mmbench" / "full" / "answers.jsonl").read_text().splitlines()[1])
    assert mmbench["question_id"] == 1_000_000 and mmbench["option_char"] == ["A", "B"]
    assert mmbench["prompt"] == "A hint.\nWhich is it 0?\nA. cotton\nB. rubber"
    for name in ("sqa", "mme", "mmbench", "pope", "gqa"):
        out = tmp_path / name
        code = evaluate.main(
            [
                "--benchmark",
                name,
                "--data",
                str(llava_eval),
                "--score",
                str(table1 / name / "full" / "answers.jsonl"),
                "--out",
                str(out),
            ]
        )
        assert code == 0, capsys.readouterr().err
        scored = json.loads((out / "results.json").read_text())["configs"]["answers"]
        original = json.loads((table1 / name / "results.json").read_text())["configs"]["full"]
        assert scored["metrics"] == original["metrics"] and scored["samples"] == original["samples"]
    capsys.readouterr()


def test_score_reads_an_answers_file_written_by_llavas_scripts(llava_eval, tmp_path, capsys):
    """As model_vqa_science writes it: the prompt marks image questions, answers are raw text."""
    lines = [
        {
            "question_id": "11",
            "prompt": "<image>\nWhat is shown?",
            "text": "B",
            "answer_id": "x",
            "model_id": "m",
            "metadata": {},
        },
        {
            "question_id": "26",
            "prompt": "How long?",
            "text": "The answer is A.",
            "answer_id": "y",
            "model_id": "m",
            "metadata": {},
        },
        {
            "question_id": "5",
            "prompt": "<image>\nWhich?",
            "text": "A.",
            "answer_id": "z",
            "model_id": "m",
            "metadata": {},
        },
    ]
    (tmp_path / "llava.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    code = evaluate.main(
        [
            "--benchmark",
            "sqa",
            "--data",
            str(llava_eval),
            "--score",
            str(tmp_path / "llava.jsonl"),
            "--out",
            str(tmp_path / "out"),
        ]
    )
    out = capsys.readouterr().out
    metrics = json.loads((tmp_path / "out" / "results.json").read_text())["configs"]["llava"]["metrics"]
    # 11 right (B), 26 right ("The answer is A."), 5 "A." fails: overall 2/3, IMG 1/2
    assert code == 0 and metrics["accuracy"] == pytest.approx(2 / 3) and metrics["img_accuracy"] == 0.5
    assert "| llava | 3/3 | 0 | 50.00 |" in out
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question_id": "999", "text": "A"}) + "\n")
    code = evaluate.main(["--benchmark", "sqa", "--data", str(llava_eval), "--score", str(tmp_path / "bad.jsonl")])
    assert code == 2 and "bad.jsonl:1: question_id '999' is not a question of sqa" in capsys.readouterr().err


def test_submission_files_are_llavas_converters_output(table1):
    answers = {r["question_id"]: r["answer"] for r in predictions(table1 / "vizwiz" / "full")}
    vizwiz = json.loads((table1 / "vizwiz" / "full" / "vizwiz_test_submission.json").read_text())
    assert vizwiz == [
        {"image": f"VizWiz_test_{i:08d}.jpg", "answer": scoring.evalai_answer(answers[str(i)])} for i in range(2)
    ]
    vqav2 = json.loads((table1 / "vqav2" / "full" / "vqav2_test-dev_submission.json").read_text())
    assert [row["question_id"] for row in vqav2] == [262144000, 262144001, 262144999]  # every test2015 question
    assert vqav2[2]["answer"] == ""  # not in test-dev: empty, as convert_vqav2_for_submission.py writes it


# ---------------------------------------------------------------------------------------------
# Each image encoded once per run, the same answers as without reuse
# ---------------------------------------------------------------------------------------------


def test_each_image_is_encoded_once_and_answers_equal_encoding_every_time(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path, questions=6)  # 3 images x 6 questions x 3 categories
    calls = {"encode": 0, "select": 0}
    for name, method in (("encode", "encode_image"), ("select", "select")):
        real = getattr(model.Llava, method)

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)

        monkeypatch.setattr(model.Llava, method, counted)
    argv = [*pope(data, images), "--configs", "full,todre-0.10,keep-64"]
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "reuse"))[0] == 0
    assert calls == {"encode": 3, "select": 9}  # 3 images; Stage 1 once per (image, configuration)
    calls.update(encode=0, select=0)
    assert run(capsys, mha, *argv, "--no-image-cache", "--out", str(tmp_path / "anew"))[0] == 0
    assert calls == {"encode": 54, "select": 54}  # 18 questions x 3 configurations
    for config in ("full", "todre-0.10", "keep-64"):
        drop = ("seconds", "seconds_alone", "peak_memory_mb")
        reuse, anew = predictions(tmp_path / "reuse" / config), predictions(tmp_path / "anew" / config)
        key = lambda r: (r["category"], r["question_id"])  # noqa: E731
        assert sorted(({k: v for k, v in r.items() if k not in drop} for r in reuse), key=key) == sorted(
            ({k: v for k, v in r.items() if k not in drop} for r in anew), key=key
        )  # every answer, token count and eviction layer identical
    results = json.loads((tmp_path / "reuse" / "results.json").read_text())["configs"]["full"]
    assert results["samples_per_s"] > results["samples_per_s_alone"] > 0  # reuse is faster per answer


# ---------------------------------------------------------------------------------------------
# Resume that cannot lie
# ---------------------------------------------------------------------------------------------


def test_an_interrupted_run_resumes_to_the_same_results(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "full,todre-0.10"]
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "once"))[0] == 0
    once = comparable(json.loads((tmp_path / "once" / "results.json").read_text()))

    real_append, written = runner.Predictions.append, []

    def interrupted(self, record):
        if len(written) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the run
        written.append(record)
        real_append(self, record)

    monkeypatch.setattr(runner.Predictions, "append", interrupted)
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "twice"))[0] == 130
    with open(tmp_path / "twice" / "full" / "predictions.jsonl", "a") as f:
        f.write('{"question_id": "9", "categ')  # and a line cut off by the kill
    monkeypatch.undo()
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "twice"))[0] == 0
    twice = comparable(json.loads((tmp_path / "twice" / "results.json").read_text()))
    assert twice == once
    lines = (tmp_path / "twice" / "full" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 12


def test_a_complete_last_record_without_its_newline_is_kept_and_not_glued(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "full"]
    out = tmp_path / "out"
    assert run(capsys, mha, *argv, "--limit", "1", "--out", str(out))[0] == 0
    path = out / "full" / "predictions.jsonl"
    path.write_text(path.read_text().rstrip("\n"))  # the newline of the last record lost
    assert run(capsys, mha, *argv, "--out", str(out))[0] == 0
    assert len(predictions(out / "full")) == 12 and path.read_text().endswith("}\n")


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"question_id": "1"}', "a prediction needs category"),
        ("[1, 2]", "a prediction must be a JSON object"),
        ("{bad", "not valid JSON"),
    ],
)
def test_a_damaged_predictions_file_is_one_line_naming_it(mha, tmp_path, capsys, line, message):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "full", "--limit", "1"]
    out = tmp_path / "out"
    assert run(capsys, mha, *argv, "--out", str(out))[0] == 0
    path = out / "full" / "predictions.jsonl"
    path.write_text(line + "\n" + path.read_text())
    code, stdout, err = run(capsys, mha, *argv, "--out", str(out))
    assert code == 2 and err.count("\n") == 1 and f"predictions.jsonl:1: {message}" in err


def test_a_changed_setting_is_refused_naming_it_and_overwrite_starts_over(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "todre-0.10"]
    out = tmp_path / "out"
    assert run(capsys, mha, *argv, "--limit", "1", "--out", str(out))[0] == 0
    code, stdout, err = run(capsys, mha, *argv, "--tau", "0.2", "--out", str(out))
    assert (
        code == 2
        and err.count("\n") == 1
        and "holds answers made with other settings (settings.tau: 0.03 -> 0.2)" in err
    )
    assert err.endswith("use another output folder, or start these answers over (--out DIR, or --overwrite)\n")
    code, stdout, err = run(capsys, mha, *argv, "--out", str(out), max_new_tokens="5")
    assert code == 2 and "max_new_tokens: 4 -> 5" in err
    assert run(capsys, mha, *argv, "--figure2", "--configs", "full", "--out", str(out))[0] == 0  # another config
    code, stdout, err = run(capsys, mha, *argv, "--out", str(out), dtype="bfloat16")
    assert code == 2 and 'dtype: "float32" -> "bfloat16"' in err
    assert run(capsys, mha, *argv, "--tau", "0.2", "--overwrite", "--out", str(out))[0] == 0
    assert len(predictions(out / "todre-0.10")) == 12


def test_another_question_set_with_the_same_ids_is_refused(mha, tmp_path, capsys):
    noise_image(120, 90, seed=8).save(tmp_path / "a.png")
    for name, question in (("one.jsonl", "What colour is it?"), ("two.jsonl", "How big is it?")):
        line = {"question_id": "q1", "image": "a.png", "question": question, "answer": "red"}
        (tmp_path / name).write_text(json.dumps(line) + "\n")
    argv = ["--benchmark", "jsonl", "--configs", "full", "--out", str(tmp_path / "out")]
    assert run(capsys, mha, *argv, "--data", str(tmp_path / "one.jsonl"))[0] == 0
    code, stdout, err = run(capsys, mha, *argv, "--data", str(tmp_path / "two.jsonl"))
    assert code == 2 and "question 'q1' (all) was answered for another text" in err


def test_a_second_run_into_the_same_folder_is_refused_naming_the_first(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    lock = runner.FolderLock(out)  # a run in progress there
    code, stdout, err = run(
        capsys,
        mha,
        *pope(data, images),
        "--configs",
        "full",
        "--out",
        str(out),
    )
    lock.release()
    assert code == 2 and f"is in use by another evaluate.py run (pid {os.getpid()})" in err


def test_the_output_folder_is_checked_before_the_model_loads(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(evaluate, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    code, stdout, err = run(
        capsys,
        mha,
        *pope(data, images),
        "--out",
        str(tmp_path / "file" / "out"),
    )
    assert code == 2 and f"cannot write the output folder {tmp_path / 'file' / 'out'}" in err


# ---------------------------------------------------------------------------------------------
# The original POPE and MME layouts, JSON lines, and the lmms-lab parquet copies
# ---------------------------------------------------------------------------------------------


def test_pope_end_to_end_in_its_original_layout(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        mha,
        *pope(data, images),
        "--configs",
        "full,todre-0.10,keep-64",
        "--out",
        str(out),
    )
    assert code == 0, err
    rows = json.loads((out / "results.json").read_text())["configs"]
    assert list(rows) == ["full", "todre-0.10", "keep-64"]
    for name, row in rows.items():
        records = predictions(out / name)
        assert row["samples"] == 12 and {(p["category"], p["question_id"]) for p in records} == {
            (c, str(q)) for c in ("random", "popular", "adversarial") for q in range(1, 5)
        }  # ids repeat across categories
        assert set(row["metrics"]) == {"random", "popular", "adversarial", "mean_f1", "column"}
    assert rows["keep-64"]["mean_visual_tokens"] == 64 and rows["full"]["relative"]["mean_f1"] in (1.0, None)
    assert "| config | answered | visual tokens | POPE | vs full |" in stdout


def test_lmms_eval_parser_and_empty_answers_are_counted(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "full"]
    monkeypatch.setattr(model.Llava, "decode", lambda self, *a, **k: iter(()))  # the model says nothing
    argv += ["--batch-size", "1"]  # one question at a time: through Llava.decode
    code, stdout, err = run(capsys, mha, *argv, "--out", str(tmp_path / "a"))
    row = json.loads((tmp_path / "a" / "results.json").read_text())["configs"]["full"]
    assert code == 0 and row["empty_answers"] == 12 and "full: 12 empty answers (counted wrong)" in stdout
    assert row["metrics"]["random"]["yes_ratio"] == 1.0  # LLaVA's rule reads "" as yes
    code, stdout, err = run(capsys, mha, *argv, "--parser", "lmms-eval", "--out", str(tmp_path / "a"))
    row = json.loads((tmp_path / "a" / "results.json").read_text())["configs"]["full"]
    assert row["unparseable"] == 12 and row["metrics"]["random"]["yes_ratio"] == 0.0  # re-read, not stale


def test_hub_parquet_scores_identically_to_the_local_layout(mha, llava_eval, tmp_path, capsys, monkeypatch):
    fake_hub(monkeypatch, make_hub_copies(llava_eval, tmp_path / "hub"))
    argv = ["--benchmark", "pope,mme,gqa", "--configs", "full"]
    assert run(capsys, mha, *argv, "--data", str(llava_eval), "--out", str(tmp_path / "local"))[0] == 0
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "hub-out"))
    assert code == 0, err
    for name in ("pope", "mme", "gqa"):
        local = json.loads((tmp_path / "local" / name / "results.json").read_text())["configs"]["full"]
        remote = json.loads((tmp_path / "hub-out" / name / "results.json").read_text())["configs"]["full"]
        assert remote["metrics"] == local["metrics"] and remote["samples"] == local["samples"]
        by_text = lambda folder: sorted((r["question"], r["answer"]) for r in predictions(folder))  # noqa: E731
        assert by_text(tmp_path / "hub-out" / name / "full") == by_text(tmp_path / "local" / name / "full")


def test_bad_data_is_one_line_naming_file_and_line_or_a_counted_skip(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    (images / "COCO_val2014_000000000001.jpg").unlink()
    argv = [*pope(data, images), "--configs", "full"]
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert re.match(rf"error: {data}/coco_pope_\w+.json:2: image not found: ", err)
    code, out, err = run(capsys, mha, *argv, "--skip-bad", "--out", str(tmp_path / "b"))
    assert code == 0, err
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert len(result["skipped"]) == 3 and result["configs"]["full"]["samples"] == 9
    assert "3 question(s) skipped" in out
    (data / "coco_pope_popular.json").write_text(
        '{"question_id": 1, "image": "x.jpg", "text": "q", "label": "yes"}\n{not json\n'
    )
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "c"))
    assert code == 2 and err.startswith(f"error: {data / 'coco_pope_popular.json'}:2: not valid JSON")


def test_each_distinct_image_is_checked_once_and_a_device_is_not_an_image(mha, tmp_path, capsys, monkeypatch):
    lines = [
        {"question_id": f"q{i}", "image": f"missing{i % 50}.png", "question": "Red?", "answer": "yes"}
        for i in range(2000)
    ]
    lines.append({"question_id": "dev", "image": "/dev/null", "question": "Red?", "answer": "yes"})
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    checked = []
    real_isfile = os.path.isfile
    monkeypatch.setattr(evaluate.os.path, "isfile", lambda p: checked.append(p) or real_isfile(p))
    argv = ["--benchmark", "jsonl", "--data", str(tmp_path / "set.jsonl"), "--configs", "full"]
    code, out, err = run(capsys, mha, *argv, "--skip-bad", "--out", str(tmp_path / "out"))
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    images = [p for p in checked if "missing" in str(p) or str(p) == "/dev/null"]
    assert code == 0 and len(result["skipped"]) == 2001 and len(images) == 51  # not once per question
    assert {s["reason"] for s in result["skipped"] if "/dev/null" in s["reason"]} == {"not a regular file: /dev/null"}


def test_odd_prediction_file_names_are_ignored_and_non_utf8_is_one_line(tmp_path):
    folder = tmp_path / "full"
    folder.mkdir()
    (folder / "predictions.rankX.jsonl").write_text("not json at all\n")
    (folder / "predictions.rank1.jsonl.bak").write_text("not json at all\n")
    assert runner.Predictions(folder).records == []
    (folder / "predictions.jsonl").write_bytes(b'{"question_id": "\xff"}\n')
    with pytest.raises(evaluate.DataError, match="predictions.jsonl: not UTF-8 text"):
        runner.Predictions(folder)


def test_a_question_too_long_for_the_context_is_tied_to_it_and_skippable(mha, tmp_path, capsys):
    noise_image(120, 90, seed=8).save(tmp_path / "a.png")
    lines = [
        {"question_id": "short", "image": "a.png", "question": "Red?", "answer": "yes"},
        {"question_id": "long", "image": "a.png", "question": "why " * 3000, "answer": "yes"},
    ]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = ["--benchmark", "jsonl", "--data", str(tmp_path / "set.jsonl"), "--configs", "full"]
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and "set.jsonl:2:" in err and "--skip-bad skips such questions" in err and "--retain" not in err
    code, out, err = run(capsys, mha, *argv, "--skip-bad", "--out", str(tmp_path / "b"))
    result = json.loads((tmp_path / "b" / "results.json").read_text())
    assert code == 0 and result["configs"]["full"]["samples"] == 1 and "set.jsonl:2" in result["skipped"][0]["question"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--benchmark", "pope", "--data", "{tmp}/nowhere"], "--data {tmp}/nowhere does not exist"),
        (["--benchmark", "pope", "--data", "{tmp}"], "has none of coco_pope_adversarial.json"),
        (["--benchmark", "mme", "--data", "{tmp}"], "holds none of MME's 14 subtask folders"),
        (["--benchmark", "jsonl", "--data", "{tmp}"], "must be a .jsonl file of questions"),
        (["--benchmark", "pope", "--data", "{tmp}", "--configs", "todre-64"], "write todre-keep-64"),
        (["--benchmark", "pope", "--data", "{tmp}", "--configs", "full,full"], "distinct configuration names"),
        (["--benchmark", "pope", "--data", "{tmp}", "--limit", "0"], "--limit must be an integer in [1, inf)"),
        (["--benchmark", "textvqa", "--data", "{tmp}"], "unknown benchmark 'textvqa'"),
        (["--benchmark", "sqa,pope", "--score", "{tmp}"], "--score scores one benchmark's answers"),
    ],
)
def test_bad_command_lines_are_one_error_line(tmp_path, capsys, argv, message):
    (tmp_path / "val2014").mkdir()
    code = evaluate.main([a.format(tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


def test_torchrun_variables_that_are_not_a_job_are_one_line(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "two")
    code, out, err = run(capsys, mha, *pope(data, images))
    assert code == 2 and "WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers" in err


# ---------------------------------------------------------------------------------------------
# Past one process: torchrun
# ---------------------------------------------------------------------------------------------


def torchrun(mha, processes: int, *argv, env_extra=None, wait=True):
    """evaluate.py under torch's own launcher, on CPUs (gloo), as a user would start it."""
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        str(HERE / "evaluate.py"),
        *argv,
        "--model",
        str(mha.directory),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-new-tokens",
        "4",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
    )
    if wait:
        out, err = process.communicate(timeout=600)
        return process.returncode, out, err
    return process


def union(folder: Path) -> dict:
    """Every prediction of a configuration folder, whatever file holds it, by question."""
    records = {}
    for path in sorted(folder.glob("predictions*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut off by a kill
            records.setdefault((record["category"], record["question_id"]), []).append(record)
    return records


def test_two_torchrun_processes_give_the_single_process_result(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "full,todre-0.10"]
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "one"))[0] == 0
    code, out, err = torchrun(mha, 2, *argv, "--out", str(tmp_path / "two"))
    assert code == 0, err
    assert out.count("| config |") == 1  # rank 0 alone prints the table
    for name in ("full", "todre-0.10"):
        assert sorted(p.name for p in (tmp_path / "two" / name).glob("predictions*")) == [
            "predictions.rank0.jsonl",
            "predictions.rank1.jsonl",
        ]
        single, sharded = union(tmp_path / "one" / name), union(tmp_path / "two" / name)
        assert sharded.keys() == single.keys() and all(len(v) == 1 for v in sharded.values())
        drop = ("seconds", "seconds_alone", "peak_memory_mb")
        assert all(
            {k: v for k, v in sharded[key][0].items() if k not in drop}
            == {k: v for k, v in single[key][0].items() if k not in drop}
            for key in single
        )
    one = comparable(json.loads((tmp_path / "one" / "results.json").read_text()))
    two = comparable(json.loads((tmp_path / "two" / "results.json").read_text()))
    assert two.pop("world_size") == 2 and one.pop("world_size") == 1
    assert two == one


def rank_pid(marker: str, rank: int) -> int | None:
    """The pid of torchrun's worker `rank` in the run tagged `marker` (from /proc/<pid>/environ)."""
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            variables = environ.read_bytes().split(b"\0")
        except OSError:
            continue
        if f"EVAL_RUN={marker}".encode() in variables and f"RANK={rank}".encode() in variables:
            return int(environ.parent.name)
    return None


def test_a_rank_killed_mid_run_loses_only_its_question_in_flight(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path, questions=10)
    argv = [
        *pope(data, images),
        "--configs",
        "full,todre-0.10",
        "--out",
        str(tmp_path / "out"),
    ]
    marker = str(tmp_path)
    launcher = torchrun(mha, 2, *argv, env_extra={"EVAL_RUN": marker}, wait=False)
    rank1_file = tmp_path / "out" / "full" / "predictions.rank1.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and (not rank1_file.exists() or len(rank1_file.read_text().splitlines()) < 3):
        time.sleep(0.02)
    pid = rank_pid(marker, 1)
    assert pid is not None and rank1_file.exists()
    os.kill(pid, signal.SIGKILL)  # rank 1 dies; torchrun then stops rank 0 as well
    launcher.communicate(timeout=300)
    assert launcher.returncode != 0
    done_before = len(union(tmp_path / "out" / "full"))
    assert 3 <= done_before < 30

    code, out, err = torchrun(mha, 3, *argv)  # rerun with another number of processes
    assert code == 0, err
    for name in ("full", "todre-0.10"):
        records = union(tmp_path / "out" / name)
        assert len(records) == 30 and all(len(v) == 1 for v in records.values())  # all done, none twice
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["world_size"] == 3 and result["configs"]["full"]["samples"] == 30


def test_figure2_records_every_layer_and_equals_what_stats_reports(gqa, tmp_path, capsys, monkeypatch):
    noise_image(300, 200, seed=9).save(tmp_path / "a.png")
    question = "What colour is it?"
    line = {"question_id": "q1", "image": "a.png", "question": question, "answer": "red"}
    (tmp_path / "set.jsonl").write_text(json.dumps(line) + "\n")
    code, out, err = run(
        capsys,
        gqa,
        "--benchmark",
        "jsonl",
        "--data",
        str(tmp_path / "set.jsonl"),
        "--configs",
        "full",
        "--figure2",
        "--out",
        str(tmp_path / "out"),
    )
    assert code == 0, err
    figure = json.loads((tmp_path / "out" / "figure2.json").read_text())
    assert figure["layers"] == list(range(8)) and figure["samples"] == 1 and figure["probe_layers"] == [3, 4, 5, 6]
    assert all(v == 0.0 for v in figure["a_vt"]) and all(0 < v < 1 for v in figure["a_tv"])  # causal: a_vt = 0
    assert (tmp_path / "out" / "figure2.png").stat().st_size > 1000

    # generate.py --stats on the same image and question, unpruned and never evicting
    argv = [
        "--model",
        str(gqa.directory),
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--image",
        str(tmp_path / "a.png"),
        "--prompt",
        question + SHORT,
        "--retain",
        "1",
        "--tau",
        "1e-9",
        "--max-new-tokens",
        "1",
        "--stats",
    ]
    assert generate.main(argv) == 0
    stats = capsys.readouterr().err
    for layer in figure["probe_layers"]:
        reported = re.search(rf"layer {layer}: a_tv=([0-9.]+) a_vt=([0-9.]+)", stats)
        assert reported and float(reported[1]) == round(figure["a_tv"][layer], 4)

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # without matplotlib: the JSON and a hint
    code, out, err = run(
        capsys,
        gqa,
        "--benchmark",
        "jsonl",
        "--data",
        str(tmp_path / "set.jsonl"),
        "--configs",
        "full",
        "--figure2",
        "--out",
        str(tmp_path / "bare"),
    )
    assert (
        code == 0 and (tmp_path / "bare" / "figure2.json").exists() and not (tmp_path / "bare" / "figure2.png").exists()
    )
    assert "figure2.png needs matplotlib: pip install matplotlib" in err


# ---------------------------------------------------------------------------------------------
# Reliability, round 4: every question counted, --score honest, resume that sees contents
# ---------------------------------------------------------------------------------------------


def answers_file(path: Path, rows: list[tuple[str, str]], model_id: str = "llava-v1.5-13b") -> Path:
    path.write_text("".join(json.dumps({"question_id": q, "text": t, "model_id": model_id}) + "\n" for q, t in rows))
    return path


def score_cli(capsys, name: str, data: Path, answers: Path, out: Path, *extra):
    code = evaluate.main(["--benchmark", name, "--data", str(data), "--score", str(answers), "--out", str(out), *extra])
    stdout, err = capsys.readouterr()
    return code, stdout, err


def test_score_reads_answers_as_stored_and_counts_missing_ones_wrong(llava_eval, tmp_path, capsys):
    """eval_science_qa.py reads "A. " as A (its "X. " rule) and gives FAILED to a question without
    an answer; the score is over every question, and marked partial when some are missing."""
    answers = answers_file(tmp_path / "sqa.jsonl", [("11", "B. ")])  # 11's answer is B; 26 and 5 unanswered
    code, stdout, err = score_cli(capsys, "sqa", llava_eval, answers, tmp_path / "out")
    row = json.loads((tmp_path / "out" / "results.json").read_text())["configs"]["sqa"]
    assert code == 0 and row["metrics"]["accuracy"] == pytest.approx(1 / 3) and row["metrics"]["img_accuracy"] == 0.5
    assert row["samples"] == 1 and row["total"] == 3 and row["missing"] == 2 and row["partial"] is True
    assert "| sqa | 1/3 | 0 | 50.00 (partial) |" in stdout and "2 missing" in stdout
    table = json.loads((tmp_path / "out" / "table.json").read_text())
    assert table["rows"][0]["partial"] == {"ScienceQA": "1/3"} and "total_seconds" not in table["rows"][0]
    assert "50.0 (1/3 answered)" in (tmp_path / "out" / "table.md").read_text()


def test_pope_with_missing_answers_says_what_is_missing_instead_of_a_score(llava_eval, tmp_path, capsys):
    answers = answers_file(tmp_path / "pope.jsonl", [("1", "Yes")])  # one right answer of 9
    code, stdout, err = score_cli(capsys, "pope", llava_eval, answers, tmp_path / "out")
    row = json.loads((tmp_path / "out" / "results.json").read_text())["configs"]["pope"]
    assert code == 0 and row["score"] is None and row["metrics"] == {}
    assert (
        row["incomplete"] == "8 of 9 answers missing (adversarial 2, popular 3, random 3): pope's score needs them all"
    )
    assert "pope: no score: 8 of 9 answers missing" in stdout and "100.0" not in stdout
    assert json.loads((tmp_path / "out" / "table.json").read_text())["rows"][0]["cells"]["POPE"] is None


def test_score_needs_no_images_claims_the_files_model_and_no_time(llava_eval, tmp_path, capsys):
    import shutil

    shutil.copytree(llava_eval / "pope", tmp_path / "data" / "pope", ignore=shutil.ignore_patterns("val2014"))
    lines = [json.loads(x) for x in (llava_eval / "pope" / "llava_pope_test.jsonl").read_text().splitlines()]
    answers = answers_file(tmp_path / "answers.jsonl", [(str(x["question_id"]), "Yes") for x in lines])
    old = os.umask(0o022)
    try:
        code, stdout, err = score_cli(capsys, "pope", tmp_path / "data", answers, tmp_path / "out")
    finally:
        os.umask(old)
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert code == 0, err
    assert result["model"] == "llava-v1.5-13b" and result["configs"]["answers"]["seconds"] is None
    assert "samples/s" not in stdout and "total time" not in (tmp_path / "out" / "table.md").read_text()
    line = json.loads((tmp_path / "out" / "answers" / "answers.jsonl").read_text().splitlines()[0])
    assert line["model_id"] == "llava-v1.5-13b-answers"
    written = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_relative_to(tmp_path / "data")]
    assert sorted(p.relative_to(tmp_path).as_posix() for p in written) == [
        "answers.jsonl",
        "out/answers/answers.jsonl",
        "out/results.json",
        "out/table.json",
        "out/table.md",
    ]  # inside --out only
    assert {oct(p.stat().st_mode & 0o777) for p in written} == {"0o644"}  # the umask's mode


def test_score_never_writes_its_own_input(llava_eval, tmp_path, capsys):
    (tmp_path / "d" / "answers").mkdir(parents=True)
    answers = answers_file(tmp_path / "d" / "answers" / "answers.jsonl", [("11", "B")])
    before = answers.read_text()
    code, stdout, err = score_cli(capsys, "sqa", llava_eval, answers, tmp_path / "d")
    assert code == 2 and "lies where the results go: give another --out" in err and answers.read_text() == before


def test_data_one_level_off_names_the_file_it_looked_for(llava_eval, tmp_path, capsys):
    import shutil

    shutil.copytree(llava_eval / "pope", tmp_path / "eval" / "pope")
    code, stdout, err = score_cli(capsys, "pope", tmp_path, answers_file(tmp_path / "a.jsonl", []), tmp_path / "out")
    assert code == 2 and "has none of coco_pope_adversarial.json" in err and str(tmp_path) in err


def pope_run(capsys, mha, data, images, out, *extra):
    return run(capsys, mha, *pope(data, images), "--configs", "full", "--limit", "1", "--out", str(out), *extra)


def test_resume_refuses_other_weight_bytes_other_processor_files_and_other_images(mha, tmp_path, capsys):
    import shutil

    data, images = make_pope(tmp_path)
    ckpt = SimpleNamespace(directory=tmp_path / "ckpt")
    shutil.copytree(mha.directory, ckpt.directory)
    out = tmp_path / "out"
    assert pope_run(capsys, ckpt, data, images, out)[0] == 0
    # the same file name and size, other weight bytes in the first sample
    weights = ckpt.directory / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    header = int.from_bytes(raw[:8], "little")
    raw[8 + header] ^= 0xFF
    weights.write_bytes(bytes(raw))
    code, stdout, err = pope_run(capsys, ckpt, data, images, out)
    assert code == 2 and "checkpoint.weights" in err
    shutil.copy(mha.directory / "model.safetensors", weights)
    # a processor setting the loader reads
    preprocessor = json.loads((ckpt.directory / "preprocessor_config.json").read_text())
    (ckpt.directory / "preprocessor_config.json").write_text(json.dumps({**preprocessor, "do_resize": True}, indent=3))
    code, stdout, err = pope_run(capsys, ckpt, data, images, out)
    assert code == 2 and "checkpoint.files_sha256" in err
    shutil.copy(mha.directory / "preprocessor_config.json", ckpt.directory / "preprocessor_config.json")
    assert pope_run(capsys, ckpt, data, images, out)[0] == 0  # all as before: resumes
    # other pixels under the same image names (another --images folder)
    other = tmp_path / "other"
    other.mkdir()
    for i, path in enumerate(sorted(images.iterdir())):
        noise_image(100, 100, seed=50 + i).save(other / path.name)
    code, stdout, err = pope_run(capsys, ckpt, data, other, out)
    assert code == 2 and "was answered about other image bytes" in err and "--overwrite" in err


def test_answers_without_a_fingerprint_are_refused_until_adopted(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    assert pope_run(capsys, mha, data, images, out)[0] == 0
    (out / "full" / "fingerprint.json").unlink()  # as an older release left them
    code, stdout, err = pope_run(capsys, mha, data, images, out)
    assert code == 2 and "holds answers but no fingerprint.json" in err and "(--adopt, or --overwrite)" in err
    assert pope_run(capsys, mha, data, images, out, "--adopt")[0] == 0
    assert (out / "full" / "fingerprint.json").exists() and len(predictions(out / "full")) == 3
    fingerprint = json.loads((out / "full" / "fingerprint.json").read_text())  # as the last release wrote it:
    fingerprint["checkpoint"]["weights"] = ["model.safetensors (123 bytes)"]  # weights by name and size
    (out / "full" / "fingerprint.json").write_text(json.dumps(fingerprint))
    code, stdout, err = pope_run(capsys, mha, data, images, out)
    assert code == 2 and "fingerprinted by an older release" in err and "(--adopt, or --overwrite)" in err
    assert pope_run(capsys, mha, data, images, out, "--adopt")[0] == 0 and len(predictions(out / "full")) == 3


def test_overwrite_takes_the_lock_first_and_deletes_nothing_of_a_running_evaluation(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    assert pope_run(capsys, mha, data, images, out)[0] == 0
    before = (out / "full" / "predictions.jsonl").read_text()
    lock = runner.FolderLock(out)  # another run holds the folder
    code, stdout, err = pope_run(capsys, mha, data, images, out, "--overwrite")
    lock.release()
    assert code == 2 and "is in use by another evaluate.py run" in err
    assert (out / "full" / "predictions.jsonl").read_text() == before


def test_the_repair_of_a_predictions_file_writes_a_new_file_over_it(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    assert pope_run(capsys, mha, data, images, out)[0] == 0
    path = out / "full" / "predictions.jsonl"
    path.write_text(path.read_text().rstrip("\n"))
    inode = path.stat().st_ino
    runner.Predictions(out / "full")  # reading it repairs the last line
    assert path.stat().st_ino != inode and path.read_text().endswith("}\n") and len(predictions(out / "full")) == 3


def test_the_split_recorded_is_the_split_used(mha, llava_eval, tmp_path, capsys):
    argv = ["--benchmark", "vizwiz", "--data", str(llava_eval), "--configs", "full", "--limit", "1"]
    out = tmp_path / "out"
    assert run(capsys, mha, *argv, "--out", str(out))[0] == 0  # no --split: LLaVA's test file is there
    assert json.loads((out / "full" / "fingerprint.json").read_text())["split"] == "test"
    assert run(capsys, mha, *argv, "--split", "test", "--out", str(out))[0] == 0  # the same split: resumes
    code, stdout, err = run(capsys, mha, *argv, "--split", "val", "--out", str(out))
    assert code == 2 and 'split: "test" -> "val"' in err


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda r: r.pop("question"), "a prediction needs question (str)"),
        (lambda r: r.update(seconds="1.5"), "seconds must be a number, got '1.5'"),
        (lambda r: r.update(visual_tokens=None), "visual_tokens must be a number, got None"),
        (lambda r: r.update(new_tokens=True), "new_tokens must be a number, got True"),
    ],
)
def test_prediction_records_with_wrong_field_types_are_one_line(mha, tmp_path, capsys, change, message):
    data, images = make_pope(tmp_path)
    out = tmp_path / "out"
    assert pope_run(capsys, mha, data, images, out)[0] == 0
    records = predictions(out / "full")
    change(records[0])
    (out / "full" / "predictions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    code, stdout, err = pope_run(capsys, mha, data, images, out)
    assert code == 2 and err.count("\n") == 1 and f"predictions.jsonl:1: {message}" in err


@pytest.mark.parametrize("target", ["/dev/zero", "/dev/full"])
def test_a_predictions_or_answers_file_linked_to_a_device_is_one_line(mha, llava_eval, tmp_path, capsys, target):
    data, images = make_pope(tmp_path)
    (tmp_path / "out" / "full").mkdir(parents=True)
    (tmp_path / "out" / "full" / "predictions.jsonl").symlink_to(target)
    code, stdout, err = pope_run(capsys, mha, data, images, tmp_path / "out", "--adopt")
    assert code == 2 and err.count("\n") == 1 and "predictions.jsonl is not a regular file" in err
    (tmp_path / "answers.jsonl").symlink_to(target)
    code, stdout, err = score_cli(capsys, "sqa", llava_eval, tmp_path / "answers.jsonl", tmp_path / "scored")
    assert code == 2 and err.count("\n") == 1 and "answers.jsonl is not a regular file" in err


def test_an_mme_release_without_a_subtasks_images_folder_names_it(llava_eval, tmp_path, capsys):
    import shutil

    shutil.copytree(llava_eval / "MME", tmp_path / "MME")
    shutil.rmtree(tmp_path / "MME" / "MME_Benchmark_release_version" / "artwork" / "images")
    code, stdout, err = score_cli(capsys, "mme", tmp_path, answers_file(tmp_path / "a.jsonl", []), tmp_path / "out")
    assert code == 2 and err.count("\n") == 1 and "artwork/images is missing: artwork's images go there" in err


# ---------------------------------------------------------------------------------------------
# Questions in batches on one shared prefix
# ---------------------------------------------------------------------------------------------


def test_batches_and_the_prefix_cache_change_no_answer_and_a_run_resumes_with_another_size(mha, tmp_path, capsys):

    data, images = make_pope(tmp_path, questions=6)  # 3 images x 6 questions x 3 categories
    argv = [*pope(data, images), "--configs", "full,todre-0.10"]
    drop = ("seconds", "seconds_alone", "peak_memory_mb")
    key = lambda r: (r["category"], r["question_id"])  # noqa: E731

    def answers(out):
        return {c: sorted(({k: v for k, v in r.items() if k not in drop} for r in predictions(out / c)), key=key)
                for c in ("full", "todre-0.10")}  # fmt: skip

    assert run(capsys, mha, *argv, "--batch-size", "5", "--out", str(tmp_path / "batched"))[0] == 0
    assert run(capsys, mha, *argv, "--no-prefix-cache", "--out", str(tmp_path / "alone"))[0] == 0
    assert answers(tmp_path / "batched") == answers(tmp_path / "alone")
    row = json.loads((tmp_path / "batched" / "results.json").read_text())["configs"]["full"]
    assert row["seconds_alone_measured"] == "1 of 18"  # the first question of every 8th image group timed alone
    once = comparable(json.loads((tmp_path / "batched" / "results.json").read_text()))
    assert run(capsys, mha, *argv, "--batch-size", "2", "--limit", "2", "--out", str(tmp_path / "resumed"))[0] == 0
    assert run(capsys, mha, *argv, "--batch-size", "7", "--out", str(tmp_path / "resumed"))[0] == 0  # same fingerprint
    assert comparable(json.loads((tmp_path / "resumed" / "results.json").read_text())) == once


def test_prompts_without_a_shared_prefix_are_answered_one_at_a_time(mha, tmp_path, capsys, monkeypatch):
    from evaluation import batched

    data, images = make_pope(tmp_path)
    argv = [*pope(data, images), "--configs", "todre-0.10"]
    monkeypatch.setattr(batched, "shared_prefix", lambda prompts, is_visual: None)  # as text before the image
    monkeypatch.setattr(batched, "answer_batch", lambda *a, **k: pytest.fail("batched without a shared prefix"))
    assert run(capsys, mha, *argv, "--batch-size", "4", "--out", str(tmp_path / "a"))[0] == 0
    monkeypatch.undo()
    assert run(capsys, mha, *argv, "--batch-size", "1", "--out", str(tmp_path / "b"))[0] == 0
    drop = ("seconds", "seconds_alone", "peak_memory_mb")
    assert [{k: v for k, v in r.items() if k not in drop} for r in predictions(tmp_path / "a" / "todre-0.10")] == [
        {k: v for k, v in r.items() if k not in drop} for r in predictions(tmp_path / "b" / "todre-0.10")
    ]


def test_a_fingerprint_names_the_pivot_only_when_it_is_not_the_default(mha):
    """Runs fingerprinted before the pivot option existed resume: the default pivot is not in the
    fingerprint's settings; a random one is, with its seed."""
    default = runner.fingerprint({}, mha.model, mha.tokenizer, todre.Settings())["settings"]
    assert set(default) == {
        "retain", "keep_tokens", "select", "newlines", "tau", "probe_fractions", "probe_layers", "evict_layer",
    }  # fmt: skip
    random = runner.fingerprint({}, mha.model, mha.tokenizer, todre.Settings(pivot="random", pivot_seed=3))
    assert (random["settings"]["pivot"], random["settings"]["pivot_seed"]) == ("random", 3)
