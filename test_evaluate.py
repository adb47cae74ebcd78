"""evaluate.py: the scorers against hand-checked predictions, the benchmark layouts, one vision encode
per sample, resume, and clear errors. The benchmarks are tiny folders built here."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest

import bench
import evaluate
import generate
import model as llava
import todre
from conftest import HERE, noise_image

# ---------------------------------------------------------------------------------------------
# Parsers, one case per branch
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes, there is a dog in the image.", "yes"),
        ("No, there is no dog.", "no"),  # 'No' as a word
        ("There is no dog in the picture", "no"),  # 'no' anywhere in the first sentence
        ("I am not sure", "no"),  # 'not'
        ("NO", "yes"),  # LLaVA's match is case-sensitive
        ("Yes. No dog, though.", "yes"),  # only the text before the first '.'
        ("no.", "no"),
        ("Nope", "yes"),  # not one of the words
        ("no,dog", "yes"),  # commas removed first: 'nodog'
        ("", "yes"),
    ],
)
def test_pope_llava_parser(answer, expected):
    assert evaluate.parse_pope_llava(answer) == expected


@pytest.mark.parametrize(
    "answer, expected", [("Yes", "yes"), (" no \n", "no"), ("Yes.", "other"), ("yes, there is", "other"), ("", "other")]
)
def test_pope_lmms_eval_parser_is_an_exact_match(answer, expected):
    assert evaluate.parse_exact_yes_no(answer) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Yes.", "yes"),
        (" no ", "no"),  # exact after lowering, stripping, dropping '.'
        ("y", "yes"),
        ("N", "no"),
        ("x", "other"),  # one character
        ("Yes, there is.", "yes"),
        ("No way", "no"),
        ("nope", "no"),  # yes / no within the first 4 characters
        ("The answer is yes", "other"),
        ("", "other"),
    ],
)
def test_mme_parser(answer, expected):
    assert evaluate.parse_mme(answer) == expected


def test_normalize_for_exact_match():
    assert evaluate.normalize("  The  Eiffel Tower. ") == "the eiffel tower"
    assert evaluate.normalize('"2"') == "2"


# ---------------------------------------------------------------------------------------------
# Metrics against hand-checked predictions
# ---------------------------------------------------------------------------------------------


def records(category, pairs):
    return [
        {"category": category, "question_id": str(i), "image": f"{i}.jpg", "pred": p, "label": y}
        for i, (p, y) in enumerate(pairs)
    ]


def test_pope_metrics_by_hand():
    # random: TP 2, FP 1, TN 1, FN 1 -> accuracy 3/5, precision 2/3, recall 2/3, F1 2/3, yes 3/5
    random = records("random", [("yes", "yes"), ("yes", "yes"), ("yes", "no"), ("no", "no"), ("no", "yes")])
    # popular: every answer "no": precision and recall 0, so F1 0 (no division by zero)
    popular = records("popular", [("no", "yes"), ("no", "no")])
    # adversarial with an unparseable answer: wrong, and in no cell of the confusion matrix
    adversarial = records("adversarial", [("yes", "yes"), ("other", "yes"), ("other", "no"), ("no", "no")])
    metrics = evaluate.pope_metrics(random + popular + adversarial)
    assert metrics["random"] == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    assert metrics["popular"] == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert metrics["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.25}
    )
    assert metrics["mean_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert list(metrics) == ["random", "popular", "adversarial", "mean_f1"]


def test_mme_metrics_by_hand():
    def image(subtask, name, *right):
        return [
            {
                "category": subtask,
                "question_id": f"{subtask}/{name}/{i + 1}",
                "image": name,
                "pred": "yes" if r else "no",
                "label": "yes",
            }
            for i, r in enumerate(right)
        ]

    # existence: 3 of 4 questions right, 1 of 2 images fully right -> 100 * (0.75 + 0.5) = 125
    # code_reasoning (cognition): all right -> 200
    rows = (
        image("existence", "a.jpg", 1, 1) + image("existence", "b.jpg", 1, 0) + image("code_reasoning", "c.png", 1, 1)
    )
    metrics = evaluate.mme_metrics(rows)
    assert metrics["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert metrics["code_reasoning"] == {"acc": 1.0, "acc_plus": 1.0, "score": 200.0}
    assert (metrics["perception"], metrics["cognition"]) == (125.0, 200.0)
    assert len(metrics["missing"]) == 12 and "OCR" in metrics["missing"] and "existence" not in metrics["missing"]


def test_jsonl_metrics_yes_no_like_pope_and_short_answers_by_exact_match():
    yes_no = records("all", [("yes", "Yes"), ("no", "yes")])
    assert evaluate.jsonl_metrics([{**r, "label": r["label"].lower()} for r in yes_no])["mean_f1"] == pytest.approx(
        2 / 3
    )
    short = records("cars", [("red", "Red."), ("blue", "green")]) + records("signs", [("stop", "STOP")])
    assert evaluate.jsonl_metrics(short) == {"cars": {"accuracy": 0.5}, "signs": {"accuracy": 1.0}, "accuracy": 2 / 3}


def test_relative_divides_by_full_and_is_null_where_full_is_zero():
    full = {"random": {"f1": 0.8, "recall": 0.0}, "mean_f1": 0.8, "missing": []}
    pruned = {"random": {"f1": 0.6, "recall": 0.1}, "mean_f1": 0.4, "missing": []}
    assert evaluate.relative(pruned, full) == {
        "random": {"f1": pytest.approx(0.75), "recall": None},
        "mean_f1": 0.5,
        "missing": None,
    }


def test_configuration_names_parse_to_the_same_settings_as_bench(tmp_path):
    args = evaluate.parse_args(["--benchmark", "pope", "--data", str(tmp_path)])
    for name in ("full", "stage2", "stage1-0.25", "todre-0.10", "todre-0.10-v2", "cls-0.10", "keep-64"):
        settings = evaluate.settings_for(name, args)
        assert settings == todre.parse_config(name)
        expected = replace(settings, evict_layer=7) if settings.tau > 0 else settings
        assert bench.settings_for(name, 7) == expected  # bench forces Stage 2 on random weights, nothing else
    tuned = evaluate.parse_args(["--benchmark", "pope", "--data", str(tmp_path), "--tau", "0.05", "--newlines", "keep"])
    assert evaluate.settings_for("todre-0.10", tuned) == todre.Settings(retain=0.10, tau=0.05, newlines="keep")
    assert evaluate.settings_for("stage1-0.10", tuned).tau == 0.0  # --tau does not switch Stage 2 on
    assert evaluate.settings_for("full", tuned) == todre.NO_PRUNING


# ---------------------------------------------------------------------------------------------
# Tiny benchmarks on disk, run on a tiny checkpoint
# ---------------------------------------------------------------------------------------------


def make_pope(root: Path, questions: int = 4) -> tuple[Path, Path]:
    """POPE's layout: three JSON Lines files numbering their questions from 1, COCO-named images."""
    images, data = root / "val2014", root / "pope"
    images.mkdir(parents=True)
    data.mkdir()
    for i in range(3):
        noise_image(160 + 40 * i, 120, seed=i).save(images / f"COCO_val2014_{i:012d}.jpg")
    for category in evaluate.POPE_CATEGORIES:
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


def make_mme(root: Path) -> Path:
    """MME's release layout, both kinds of folder: posters (images/ + questions_answers_YN/),
    existence and code_reasoning (images beside their .txt)."""
    data = root / "MME_Benchmark_release_version"
    (data / "posters" / "images").mkdir(parents=True)
    (data / "posters" / "questions_answers_YN").mkdir()
    noise_image(200, 300, seed=5).save(data / "posters" / "images" / "tt0001.jpg")
    (data / "posters" / "questions_answers_YN" / "tt0001.txt").write_text(
        "Is this movie titled Up? Please answer yes or no.\tYes\n"
        "Is this movie titled Down? Please answer yes or no.\tNo\n"
    )
    for subtask, seed in (("existence", 6), ("code_reasoning", 7)):
        (data / subtask).mkdir()
        for name in ("000001", "000002"):
            noise_image(150, 100, seed=seed).save(data / subtask / f"{name}.png")
            (data / subtask / f"{name}.txt").write_text(
                "Is there a cat? Please answer yes or no.\tYes\r\nIs there a cow? Please answer yes or no.\tNo\r\n"
            )
    return data


def run(capsys, mha, *argv):
    code = evaluate.main(
        [*argv, "--model", str(mha.directory), "--device", "cpu", "--dtype", "float32", "--max-new-tokens", "4"]
    )
    out, err = capsys.readouterr()
    return code, out, err


def comparable(result: dict) -> dict:
    """results.json without what depends on the clock and the process (timings, memory)."""
    for row in result["configs"].values():
        row.pop("samples_per_s")
        row.pop("peak_memory_mb")
    return result


def test_pope_end_to_end_with_one_vision_encode_per_sample(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    encodes = []
    real_encode = llava.Llava.encode_image
    monkeypatch.setattr(
        llava.Llava, "encode_image", lambda self, *a, **k: encodes.append(1) or real_encode(self, *a, **k)
    )
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        mha,
        "--benchmark",
        "pope",
        "--data",
        str(data),
        "--images",
        str(images),
        "--configs",
        "full,todre-0.10,keep-64",
        "--out",
        str(out),
    )
    assert code == 0, err
    assert len(encodes) == 12  # 12 questions, 3 configurations: the vision tower ran once per question
    result = json.loads((out / "results.json").read_text())
    assert set(result) >= {"benchmark", "model", "world_size", "configs"} and result["world_size"] == 1
    rows = result["configs"]
    assert list(rows) == ["full", "todre-0.10", "keep-64"]
    for name, row in rows.items():
        assert set(row) >= {
            "samples",
            "samples_per_s",
            "mean_visual_tokens",
            "evict_layer_histogram",
            "mean_prefill_tflops",
            "peak_memory_mb",
            "metrics",
            "relative",
        }
        assert row["samples"] == 12 and set(row["metrics"]) == {"random", "popular", "adversarial", "mean_f1"}
        predictions = [json.loads(line) for line in (out / name / "predictions.jsonl").read_text().splitlines()]
        assert len(predictions) == 12 and {(p["category"], p["question_id"]) for p in predictions} == {
            (c, str(q)) for c in evaluate.POPE_CATEGORIES for q in range(1, 5)
        }  # ids repeat across categories
        for p in predictions:
            assert set(p) >= {
                "question_id",
                "image",
                "category",
                "question",
                "answer",
                "pred",
                "label",
                "visual_tokens",
                "evict_layer",
                "seconds",
            }
            assert p["pred"] == evaluate.parse_pope_llava(p["answer"])
        assert row["metrics"] == evaluate.pope_metrics(predictions)  # the scores are those of the predictions
    assert rows["keep-64"]["mean_visual_tokens"] == 64
    assert rows["full"]["mean_visual_tokens"] > rows["todre-0.10"]["mean_visual_tokens"]
    assert rows["full"]["relative"]["mean_f1"] in (1.0, None)
    assert "| config | samples | visual tokens | F1 random | F1 popular | F1 adversarial | mean F1 |" in stdout


def test_an_interrupted_run_resumes_to_the_same_results(mha, tmp_path, capsys, monkeypatch):
    data, images = make_pope(tmp_path)
    argv = ["--benchmark", "pope", "--data", str(data), "--images", str(images), "--configs", "full,todre-0.10"]
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "once"))[0] == 0
    once = comparable(json.loads((tmp_path / "once" / "results.json").read_text()))

    real_append, written = evaluate.Predictions.append, []

    def interrupted(self, record):
        if len(written) == 7:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the 4th question
        written.append(record)
        real_append(self, record)

    monkeypatch.setattr(evaluate.Predictions, "append", interrupted)
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "twice"))[0] == 130
    with open(tmp_path / "twice" / "full" / "predictions.jsonl", "a") as f:
        f.write('{"question_id": "9", "categ')  # and a line cut off by the kill
    monkeypatch.undo()
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "twice"))[0] == 0
    twice = comparable(json.loads((tmp_path / "twice" / "results.json").read_text()))
    assert twice == once
    lines = (tmp_path / "twice" / "full" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == len(set(lines)) == 12


def test_mme_release_layout_and_question_ids(mha, tmp_path, capsys):
    data = make_mme(tmp_path)
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys, mha, "--benchmark", "mme", "--data", str(data), "--configs", "full", "--out", str(out)
    )
    assert code == 0, err
    predictions = [json.loads(line) for line in (out / "full" / "predictions.jsonl").read_text().splitlines()]
    ids = sorted(p["question_id"] for p in predictions)
    assert ids == [
        "code_reasoning/000001.png/1",
        "code_reasoning/000001.png/2",
        "code_reasoning/000002.png/1",
        "code_reasoning/000002.png/2",
        "existence/000001.png/1",
        "existence/000001.png/2",
        "existence/000002.png/1",
        "existence/000002.png/2",
        "posters/tt0001.jpg/1",
        "posters/tt0001.jpg/2",
    ]
    assert {p["label"] for p in predictions} == {"yes", "no"}
    assert all(p["pred"] == evaluate.parse_mme(p["answer"]) for p in predictions)
    metrics = json.loads((out / "results.json").read_text())["configs"]["full"]["metrics"]
    assert metrics == evaluate.mme_metrics(predictions)
    assert metrics["perception"] == metrics["existence"]["score"] + metrics["posters"]["score"]
    assert metrics["cognition"] == metrics["code_reasoning"]["score"] and len(metrics["missing"]) == 11
    assert "| config | samples | visual tokens | perception | cognition |" in stdout
    question = evaluate.question_text(evaluate.load_mme(data)[0], "mme")
    assert question.endswith("?\nAnswer the question using a single word or phrase.")  # lmms-eval's prompt


def test_jsonl_short_answers_and_the_lmms_eval_parser(mha, tmp_path, capsys):
    noise_image(120, 90, seed=8).save(tmp_path / "a.png")
    lines = [
        {"question_id": "q1", "image": "a.png", "question": "What colour is it?", "answer": "red"},
        {"question_id": "q2", "image": "a.png", "question": "Is it red?", "answer": "yes", "category": "yn"},
    ]
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    out = tmp_path / "out"
    code, stdout, err = run(
        capsys,
        mha,
        "--benchmark",
        "jsonl",
        "--data",
        str(tmp_path / "set.jsonl"),
        "--configs",
        "full",
        "--parser",
        "lmms-eval",
        "--out",
        str(out),
    )
    assert code == 0, err
    predictions = {
        p["question_id"]: p for p in map(json.loads, (out / "full" / "predictions.jsonl").read_text().splitlines())
    }
    assert predictions["q1"]["pred"] == evaluate.normalize(predictions["q1"]["answer"])
    assert predictions["q2"]["pred"] == evaluate.parse_exact_yes_no(predictions["q2"]["answer"])
    row = json.loads((out / "results.json").read_text())["configs"]["full"]
    assert row["unparseable"] == (predictions["q2"]["pred"] == "other")
    assert set(row["metrics"]) == {"all", "yn", "accuracy"}


def test_bad_data_is_one_line_naming_file_and_line_or_a_counted_skip(mha, tmp_path, capsys):
    data, images = make_pope(tmp_path)
    (images / "COCO_val2014_000000000001.jpg").unlink()
    argv = ["--benchmark", "pope", "--data", str(data), "--images", str(images), "--configs", "full"]
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "a"))
    assert code == 2 and out == "" and err.count("\n") == 1
    assert err.startswith(f"error: {data / 'coco_pope_random.json'}:2: image not found: ")
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
    (data / "coco_pope_popular.json").write_text('{"question_id": 1, "image": "x.jpg", "label": "maybe"}\n')
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "d"))
    assert code == 2 and "coco_pope_popular.json:1: missing field(s) text" in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--benchmark", "pope", "--data", "{tmp}/nowhere", "--images", "{tmp}"],
            "--data {tmp}/nowhere does not exist",
        ),
        (["--benchmark", "pope", "--data", "{tmp}"], "--images DIR is needed for POPE"),
        (["--benchmark", "pope", "--data", "{tmp}", "--images", "{tmp}"], "has none of coco_pope_random.json"),
        (["--benchmark", "mme", "--data", "{tmp}"], "holds none of MME's 14 subtask folders"),
        (["--benchmark", "jsonl", "--data", "{tmp}"], "must be a .jsonl file of questions"),
        (["--benchmark", "pope", "--data", "{tmp}", "--configs", "todre-64"], "write todre-keep-64"),
        (["--benchmark", "pope", "--data", "{tmp}", "--configs", "full,full"], "distinct configuration names"),
        (["--benchmark", "pope", "--data", "{tmp}", "--limit", "0"], "--limit must be an integer in [1, inf)"),
        (["--benchmark", "gqa", "--data", "{tmp}"], "argument --benchmark: invalid choice: 'gqa'"),
    ],
)
def test_bad_command_lines_are_one_error_line(tmp_path, capsys, argv, message):
    code = evaluate.main([a.format(tmp=tmp_path) for a in argv])
    out, err = capsys.readouterr()
    assert code == 2 and out == "" and err.count("\n") == 1 and message.format(tmp=tmp_path) in err, err


# ---------------------------------------------------------------------------------------------
# Past one process and past local folders: torchrun, the Hub's parquet copies, Figure 2
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
    argv = ["--benchmark", "pope", "--data", str(data), "--images", str(images), "--configs", "full,todre-0.10"]
    assert run(capsys, mha, *argv, "--out", str(tmp_path / "one"))[0] == 0
    code, out, err = torchrun(mha, 2, *argv, "--out", str(tmp_path / "two"))
    assert code == 0, err
    assert out.count("| config |") == 1  # rank 0 alone prints the table
    for name in ("full", "todre-0.10"):
        assert sorted(p.name for p in (tmp_path / "two" / name).iterdir()) == [
            "predictions.rank0.jsonl",
            "predictions.rank1.jsonl",
        ]
        single, sharded = union(tmp_path / "one" / name), union(tmp_path / "two" / name)
        assert sharded.keys() == single.keys() and all(len(v) == 1 for v in sharded.values())
        drop = ("seconds", "peak_memory_mb")
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
        "--benchmark",
        "pope",
        "--data",
        str(data),
        "--images",
        str(images),
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


def write_lmms_parquet(path: Path, samples, benchmark: str, row_group_size: int = 4) -> None:
    """The same questions in lmms-lab's parquet schema, images embedded, several row groups."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []
    for s in samples:
        image = {"bytes": Path(s.image).read_bytes(), "path": Path(s.image).name}
        if benchmark == "mme":
            rows.append(
                {
                    "question_id": f"{s.category}/{Path(s.image).name}",
                    "image": image,
                    "question": s.question,
                    "answer": s.label.capitalize(),
                    "category": s.category,
                }
            )
        else:
            rows.append(
                {
                    "id": str(len(rows)),
                    "question_id": s.question_id,
                    "question": s.question,
                    "answer": s.label,
                    "image_source": Path(s.image).stem,
                    "image": image,
                    "category": s.category,
                }
            )
    path.parent.mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


@pytest.mark.parametrize("which", ["pope", "mme"])
def test_hub_parquet_scores_identically_to_the_local_layout(mha, tmp_path, capsys, monkeypatch, which):
    import huggingface_hub

    if which == "pope":
        data, images = make_pope(tmp_path)
        local = ["--data", str(data), "--images", str(images)]
        samples = evaluate.load_pope(data, images)
    else:
        data = make_mme(tmp_path)
        local, samples = ["--data", str(data)], evaluate.load_mme(data)
    hub = tmp_path / "hub"
    write_lmms_parquet(hub / "data" / "test-00000-of-00001.parquet", samples, which)
    calls = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: calls.append(kwargs) or str(hub))
    argv = ["--benchmark", which, "--configs", "full,keep-64"]
    assert run(capsys, mha, *argv, *local, "--out", str(tmp_path / "local"))[0] == 0
    code, out, err = run(capsys, mha, *argv, "--out", str(tmp_path / "hub-out"))
    assert code == 0, err
    repo = "lmms-lab/POPE" if which == "pope" else "lmms-lab/MME"
    assert calls == [{"repo_id": repo, "repo_type": "dataset", "allow_patterns": ["data/*.parquet"]}]
    from_disk = json.loads((tmp_path / "local" / "results.json").read_text())["configs"]
    from_hub = json.loads((tmp_path / "hub-out" / "results.json").read_text())["configs"]
    for name in ("full", "keep-64"):
        assert from_hub[name]["metrics"] == from_disk[name]["metrics"] and from_hub[name]["samples"] == len(samples)
        disk = {key: records[0]["answer"] for key, records in union(tmp_path / "local" / name).items()}
        hub_answers = {key: records[0]["answer"] for key, records in union(tmp_path / "hub-out" / name).items()}
        assert hub_answers == disk  # the same questions, ids and answers


def test_hub_without_pyarrow_or_offline_is_one_line(mha, tmp_path, capsys, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    make_pope(tmp_path)
    write_lmms_parquet(
        tmp_path / "hub" / "data" / "x.parquet", evaluate.load_pope(tmp_path / "pope", tmp_path / "val2014"), "pope"
    )
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    code, out, err = run(capsys, mha, "--benchmark", "pope")
    assert (
        code == 2
        and err
        == "error: reading lmms-lab/POPE needs pyarrow: pip install pyarrow "
        "(or pass the original layout with --data DIR)\n"
    )

    def offline(**kwargs):
        raise LocalEntryNotFoundError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    code, out, err = run(capsys, mha, "--benchmark", "mme")
    assert code == 2 and "if you are offline, pass a local copy with --data DIR" in err and err.count("\n") == 1


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
        question + evaluate.SUFFIX,
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
