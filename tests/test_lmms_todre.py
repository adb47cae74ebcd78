"""lmms_todre.py: the `todre` model inside the real lmms-eval, offline. Tiny POPE, MME and Video-MME
copies in lmms-lab's column layout, run by lmms-eval's own command line on a tiny checkpoint; the
answers it logs are generate.py's, the pruning configurations reach the model, video follows the
paper's sampling, and the paper's Table 2 Averages come back from result files."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INSTALL = "needs lmms-eval: pip install -r requirements-lmms.txt"
lmms_eval = pytest.importorskip("lmms_eval", reason=INSTALL)
datasets = pytest.importorskip("datasets", reason=INSTALL)

import pyarrow.parquet as pq
import torch

import lmms_todre
import media
import model
from conftest import HERE, SHORT, make_hub_copies, make_llava_eval, write_video
from evaluation import configs

TASKS = Path(lmms_eval.__file__).parent / "tasks"


def as_hf_parquet(source: Path, target: Path) -> Path:
    """lmms-lab's parquet with the Hub's `datasets` metadata, so that `image` loads as a picture."""
    rows = pq.read_table(source).to_pylist()
    datasets.Dataset.from_list(rows).cast_column("image", datasets.Image()).to_parquet(str(target))
    return target


@pytest.fixture(scope="module")
def tasks(tmp_path_factory):
    """Task files that take lmms-eval's own POPE, MME and Video-MME tasks and point them at local
    parquet files (its documented way to run a task on local data), and the videos where
    Video-MME looks for them ($HF_HOME/videomme/data/<videoID>.mp4)."""
    root = tmp_path_factory.mktemp("lmms")
    hub = make_hub_copies(make_llava_eval(root / "data"), root / "hub")
    folder = root / "tasks"
    folder.mkdir()
    for name, source in (("pope", "lmms-lab_POPE"), ("mme", "lmms-lab_MME")):
        parquet = as_hf_parquet(hub / source / "data" / "test-00000-of-00001.parquet", root / f"{name}.parquet")
        (folder / f"{name}_tiny.yaml").write_text(
            f"include: {TASKS / name / f'{name}.yaml'}\ntask: {name}_tiny\ndataset_path: parquet\n"
            f"dataset_kwargs:\n  data_files:\n    test: {parquet}\n"
        )
    videos = root / "hf_home" / "videomme" / "data"
    videos.mkdir(parents=True)
    rows = []
    for i, (frames, fps) in enumerate(((8, 2), (45, 3))):
        write_video(videos / f"clip{i}.mp4", frames, fps)
        rows.append(
            {
                "videoID": f"clip{i}",
                "question_id": f"{i}-1",
                "question": "What colour is the video?",
                "options": ["A. red", "B. green", "C. blue", "D. grey"],
                "answer": "A",
                "duration": "short",
                "domain": "Knowledge",
                "sub_category": "Humanity & History",
                "task_type": "Counting Problem",
                "url": "",
                "video_id": str(i),
            }
        )
    datasets.Dataset.from_list(rows).to_parquet(str(root / "videomme.parquet"))
    (folder / "videomme_tiny.yaml").write_text(
        f"include: {TASKS / 'videomme' / 'videomme.yaml'}\ntask: videomme_tiny\ndataset_path: parquet\n"
        f"dataset_kwargs:\n  data_files:\n    test: {root / 'videomme.parquet'}\n  video: True\n"
        "  cache_dir: videomme\n"
    )
    return root


def run_lmms_eval(ckpt, tasks: Path, out: Path, config: str, task_names: str, model_name: str = "todre"):
    argv = [
        sys.executable,
        str(HERE / "lmms_todre.py"),
        "--model",
        model_name,
        "--model_args",
        f"pretrained={ckpt.directory},config={config},device=cpu,dtype=float32",
        "--tasks",
        task_names,
        "--include_path",
        str(tasks / "tasks"),
        "--batch_size",
        "1",
        "--log_samples",
        "--output_path",
        str(out),
    ]
    env = {**os.environ, "HF_HOME": str(tasks / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(next(out.rglob("*_results.json")).read_text())
    samples = {
        path.name.split("_samples_")[1].removesuffix(".jsonl"): [json.loads(x) for x in path.read_text().splitlines()]
        for path in out.rglob("*_samples_*.jsonl")
    }
    return results, samples


def test_lmms_eval_runs_todre_and_logs_generate_pys_answers(mha, tasks, tmp_path, capsys):
    results, samples = run_lmms_eval(mha, tasks, tmp_path / "out", "todre-0.10", "pope_tiny,mme_tiny")
    assert {"pope_tiny", "mme_tiny"} <= set(results["results"])
    assert "pope_f1_score,none" in results["results"]["pope_tiny"]
    assert len(samples["pope_tiny"]) == 9 and len(samples["mme_tiny"]) == 6
    rows = pq.read_table(tasks / "pope.parquet").to_pylist()  # lmms-eval's doc_id is the row number
    settings = configs.parse_config("todre-0.10")
    for sample in samples["pope_tiny"]:
        row = rows[sample["doc_id"]]
        image = media.open_image_bytes(row["image"]["bytes"], "row")
        question = row["question"].strip() + SHORT
        # what evaluate.py stores for this image and question (generate.py's pipeline, answer stripped)
        reply = model.ask(mha.model, mha.tokenizer, question, mha.model.encode_image(image), settings, 128)
        logged = sample["filtered_resps"]
        logged = logged[0] if isinstance(logged, list) else logged
        assert logged == reply.text.strip()
    capsys.readouterr()


def test_the_configuration_reaches_the_model(mha, tasks):
    """In-process, through lmms-eval's own model construction: full keeps every visual token, the
    budgets keep what they say."""

    class Request:
        def __init__(self, image):
            self.args = (
                "Is it red?" + SHORT,
                {"max_new_tokens": 3, "until": ["\n\n"]},
                lambda doc: [image],
                0,
                "t",
                "s",
            )

    image = media.open_image(str(next((tasks / "data").rglob("COCO_val2014_000000000000.jpg"))))
    kept = {}
    for config in ("full", "todre-0.10", "keep-64"):
        lmm = lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config={config},dtype=float32")
        lmm.task_dict = {"t": {"s": {0: {}}}}
        (answer,) = lmm.generate_until([Request(image)])
        kept[config] = lmm.visual_tokens[-1]["visual_tokens"]
        visual = mha.model.encode_image(image)
        ids = model.prompt_ids(mha.tokenizer, "Is it red?" + SHORT, kept[config])
        selected = visual.tokens[mha.model.select(visual, configs.parse_config(config))]
        expected = model.generate(mha.model, ids, selected, configs.parse_config(config), 3)
        assert answer == mha.tokenizer.decode(expected.token_ids).strip()
    assert kept["full"] == len(image_visual_tokens(mha, image)) and kept["keep-64"] == 64
    assert kept["todre-0.10"] == round(0.1 * (kept["full"] - newlines(mha, image)))


def image_visual_tokens(ckpt, image):
    return ckpt.model.encode_image(image).tokens


def newlines(ckpt, image):
    from anyres import NEWLINE

    return int((ckpt.model.encode_image(image).sources == NEWLINE).sum())


def test_video_tasks_follow_the_papers_frame_sampling(mha, tasks, tmp_path):
    """Video-MME through lmms-eval with --model llava_vid (its prompt, as the paper ran): each
    video read at one frame a second, pooled to 144 tokens a frame with grid newlines."""
    results, samples = run_lmms_eval(mha, tasks, tmp_path / "out", "full", "videomme_tiny", model_name="llava_vid")
    assert "videomme_perception_score,none" in results["results"]["videomme_tiny"]
    assert len(samples["videomme_tiny"]) == 2
    lmm = lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=full,dtype=float32")
    lmm.task_dict = {"t": {"s": {0: {}}}}
    for i, expected_frames in ((0, [0, 2, 4, 6]), (1, list(range(0, 45, 3)))):
        path = str(tasks / "hf_home" / "videomme" / "data" / f"clip{i}.mp4")

        class Request:
            args = ("Which?", {"max_new_tokens": 1}, lambda doc, path=path: [path], 0, "t", "s")

        assert media.open_video(path, 20).indices == expected_frames  # 1 fps, every round(fps)-th frame
        ids, embeds, _ = lmm.inputs("Which?", Request())
        assert len(embeds) == len(expected_frames) * (144 + 12)  # 12 x 12 pooled, a newline per row


def test_loglikelihood_is_the_continuations_log_probability(mha):
    """Against transformers' own model on the same prompt ids: the sum of the continuation's token
    log-probabilities, and whether greedy decoding gives it."""

    class Request:
        args = ("Is it red?", "yes", lambda doc: [], 0, "t", "s")

    lmm = lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=full,dtype=float32")
    lmm.task_dict = {"t": {"s": {0: {}}}}
    ((logprob, greedy),) = lmm.loglikelihood([Request()])
    ids = model.prompt_ids(mha.tokenizer, "Is it red?")
    cont = torch.tensor(mha.tokenizer.encode("yes", add_special_tokens=False).ids)
    full = torch.cat([ids, cont])
    with torch.inference_mode():
        logits = mha.hf(input_ids=full[None]).logits[0, len(ids) - 1 : -1].log_softmax(-1)
    assert logprob == pytest.approx(float(logits.gather(-1, cont[:, None]).sum()), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == cont).all())


def test_table2_reproduces_the_papers_averages_from_lmms_eval_results(tmp_path, capsys):
    paper = {  # Table 2 of the paper: VideoMME, EgoSchema, MLVU, LongVideoBench
        "full": (33.3, 35.7, 20.1, 42.5),
        "todre-0.25": (33.5, 41.4, 20.3, 43.5),
        "todre-0.10": (33.4, 40.6, 20.0, 42.3),
    }
    argv = ["table2"]
    for config, cells in paper.items():
        folder = tmp_path / config / "model"
        folder.mkdir(parents=True)
        results = {
            task: {f"{metric},none": value, f"{metric}_stderr,none": "N/A"}
            for (task, (_, metric)), value in zip(lmms_todre.TABLE2.items(), cells, strict=True)
        }
        (folder / "20250101_000000_results.json").write_text(json.dumps({"results": results}))
        argv.append(f"{config}={tmp_path / config}")
    assert lmms_todre.main([*argv, "--out", str(tmp_path / "table2")]) == 0
    table = json.loads((tmp_path / "table2" / "table.json").read_text())
    averages = {row["config"]: round(row["average"], 1) for row in table["rows"]}
    assert averages == {"full": 100.0, "todre-0.25": 105.0, "todre-0.10": 103.3}  # as the paper prints them
    assert table["columns"] == ["VideoMME", "Egoschema", "MLVU", "LongVideoBench"]
    assert "| todre-0.25 | 33.500 | 41.400 | 20.300 | 43.500 | 105.0% |" in capsys.readouterr().out


def test_without_lmms_eval_or_with_bad_arguments_it_is_one_line(mha, monkeypatch, capsys):
    monkeypatch.setattr(lmms_todre, "LMMsModel", object)
    assert lmms_todre.main(["--model", "todre"]) == 2
    assert capsys.readouterr().err == "error: this needs lmms-eval: pip install -r requirements-lmms.txt\n"
    monkeypatch.undo()
    assert lmms_todre.main(["table2", "full"]) == 2 and "CONFIG=RESULTS pairs" in capsys.readouterr().err
    with pytest.raises(lmms_todre.UsageError, match="unknown configuration 'todre-64'|write todre-keep-64"):
        lmms_todre.ToDRE(pretrained=str(mha.directory), config="todre-64")


def test_several_images_get_a_placeholder_each_and_are_pruned_each_on_its_own(mha):
    images = [media.open_image_bytes(_png(seed), "img") for seed in (1, 2)]

    class Request:
        args = ("Same?", {"max_new_tokens": 2}, lambda doc: images, 0, "t", "s")

    lmm = lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=keep-64,dtype=float32")
    lmm.task_dict = {"t": {"s": {0: {}}}}
    ids, embeds, _ = lmm.inputs("Same?", Request())
    is_visual = (ids == mha.model.config.image_token_index).int()
    runs = int((is_visual[1:] - is_visual[:-1] == 1).sum())
    assert len(embeds) == 128 and int(is_visual.sum()) == 128 and runs == 2  # 64 + 64, two placeholder runs
    text = mha.tokenizer.conversation("Same?", images=2)
    assert "<image> <image>\nSame?" in text  # as lmms-eval's llava writes several images
    (answer,) = lmm.generate_until([Request()])
    assert isinstance(answer, str)


def _png(seed: int) -> bytes:
    import io

    from conftest import noise_image

    buffer = io.BytesIO()
    noise_image(90, 70, seed=seed).save(buffer, format="PNG")
    return buffer.getvalue()


def lmms_eval_cli(ckpt, tasks: Path, tmp_path: Path, model_args: str, *extra):
    argv = [sys.executable, str(HERE / "lmms_todre.py"), "--model", "todre", "--model_args"]
    argv += [f"pretrained={ckpt.directory},device=cpu,{model_args}", "--tasks", "pope_tiny"]
    argv += ["--include_path", str(tasks / "tasks"), "--output_path", str(tmp_path / "out"), *extra]
    env = {**os.environ, "HF_HOME": str(tasks / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize(
    "model_args, extra, message",
    [
        ("config=todre-010", [], "model argument config: configuration 'todre-010': the budget is a fraction"),
        ("config=todre-0.10,max_frames=abc", [], "model argument max_frames must be a whole number"),
        ("config=todre-0.10,dtype=float8", [], "model argument dtype must be one of auto, float16"),
        ("config=todre-0.10", ["--batch_size", "auto"], "--batch_size must be a whole number of requests answered"),
    ],
)
def test_errors_inside_lmms_evals_run_are_one_line_and_a_failing_exit(mha, tasks, tmp_path, model_args, extra, message):
    """lmms-eval catches what its run raises, prints a traceback and exits 0; lmms_todre.py gets
    the error past it: one `error:` line, exit code 2."""
    done = lmms_eval_cli(mha, tasks, tmp_path, model_args, *extra)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and last.startswith("error: ") and message in last, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


def test_a_context_that_holds_its_own_image_placeholders_gets_the_images_there(mha):
    """Interleaved tasks write <image> into the context where each image goes, as lmms-eval's llava
    takes them; the images are pruned each on its own and placed at those placeholders."""
    images = [media.open_image_bytes(_png(seed), "img") for seed in (3, 4)]
    question = "First <image> then <image>: same?"

    class Request:
        args = (question, {"max_new_tokens": 2}, lambda doc: images, 0, "t", "s")

    lmm = lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=keep-64,dtype=float32")
    lmm.task_dict = {"t": {"s": {0: {}}}}
    ids, embeds, _ = lmm.inputs(question, Request())
    image_id = mha.model.config.image_token_index
    expected = mha.tokenizer.tokenizer.encode(mha.tokenizer.conversation(question, with_media=False)).ids
    first = expected.index(image_id)
    second = expected.index(image_id, first + 1)
    expanded = expected[:first] + [image_id] * 64 + expected[first + 1 : second] + [image_id] * 64
    expanded += expected[second + 1 :]
    assert ids.tolist() == expanded and len(embeds) == 128
    (answer,) = lmm.generate_until([Request()])
    assert isinstance(answer, str)

    class OnePlaceholderTwoImages:
        args = ("Only <image> here", {"max_new_tokens": 2}, lambda doc: images, 0, "t", "s")

    with pytest.raises(model.InputError, match="holds 1 <image> placeholders for 2 visual input"):
        lmm.inputs("Only <image> here", OnePlaceholderTwoImages())


def test_table2_takes_each_tasks_newest_result_across_all_results_files(tmp_path, capsys):
    folder = tmp_path / "logs" / "model"
    folder.mkdir(parents=True)
    names = list(lmms_todre.TABLE2)
    runs = [  # tasks run one at a time, and videomme run twice: the second run counts
        (names[0], 10.0),
        (names[1], 40.0),
        (names[0], 33.3),
    ]
    for i, (task, value) in enumerate(runs):
        metric = lmms_todre.TABLE2[task][1]
        path = folder / f"2025010{i}_results.json"
        path.write_text(json.dumps({"results": {task: {f"{metric},none": value}}}))
        os.utime(path, (1000 + i, 1000 + i))
    assert lmms_todre.main(["table2", f"full={tmp_path / 'logs'}", "--out", str(tmp_path / "t")]) == 0
    out, err = capsys.readouterr()
    table = json.loads((tmp_path / "t" / "table.json").read_text())
    assert table["rows"][0]["cells"] == {"VideoMME": 33.3, "Egoschema": 40.0, "MLVU": None, "LongVideoBench": None}
    assert table["missing"] == {"full": names[2:]} and f"full: no result for {', '.join(names[2:])}" in err


@pytest.mark.parametrize(
    "content, message",
    [
        ("[1, 2]", "has no 'results' object of tasks"),
        ('{"results": {"videomme": [1]}}', "has no 'results' object of tasks"),
        ('{"results": 5}', "has no 'results' object of tasks"),
        ("{not json", "not valid JSON"),
    ],
)
def test_table2_bad_results_files_and_outputs_are_one_line(tmp_path, capsys, content, message):
    (tmp_path / "r_results.json").write_text(content)
    assert lmms_todre.main(["table2", f"full={tmp_path / 'r_results.json'}", "--out", str(tmp_path / "t")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    (tmp_path / "good_results.json").write_text(json.dumps({"results": {}}))
    (tmp_path / "file").write_text("")
    assert lmms_todre.main(["table2", f"full={tmp_path / 'good_results.json'}", "--out", str(tmp_path / "file")]) == 2
    assert "--out" in capsys.readouterr().err


def test_requests_about_one_image_answered_together_equal_one_at_a_time(mha):
    """lmms-eval hands the model every request at once; those about the same image share one
    prefix and one batch, with the answers one at a time gives."""
    pictures = [media.open_image_bytes(_png(seed), "img") for seed in (5, 6)]
    questions = ["Is there a dog?", "What colour is it?", "How many?", "Is it day?"]

    def request(question, image):
        class Request:
            args = (question, {"max_new_tokens": 5, "until": ["\n\n"]}, lambda doc: [image], 0, "t", "s")

        return Request()

    requests = [request(q, pictures[0]) for q in questions[:3]] + [request(questions[3], pictures[1])]
    answers, kept = {}, {}
    for size in (1, 2):
        lmm = lmms_todre.ToDRE.create_from_arg_string(
            f"pretrained={mha.directory},config=todre-0.25,dtype=float32,batch_size={size}"
        )
        lmm.task_dict = {"t": {"s": {0: {}}}}
        groups = lmm.same_image_groups(requests)
        assert sorted(len(g) for g in groups) == [1, 3]
        answers[size] = lmm.generate_until(requests)
        kept[size] = sorted(v["visual_tokens"] for v in lmm.visual_tokens)
    assert answers[1] == answers[2] and len(answers[1]) == 4 and kept[1] == kept[2]


def test_qwen_runs_in_lmms_eval_with_asks_answers_and_transformers_loglikelihood(qwen_ckpt, tasks, tmp_path):
    """pretrained=<a Qwen2.5-VL checkpoint>: lmms-eval's POPE logs model.ask's answers at lmms-eval's
    qwen2_5_vl image sizes (200704 to 1605632 pixels), read as that model reads them (no "\n\n"
    stop, nothing stripped), and a loglikelihood request with an image equals transformers'
    log-probability of the continuation at the unpruned M-RoPE positions."""
    from conftest import QWEN_PIXELS, noise_image

    results, samples = run_lmms_eval(qwen_ckpt, tasks, tmp_path / "out", "full", "pope_tiny")
    assert "pope_f1_score,none" in results["results"]["pope_tiny"]
    rows = pq.read_table(tasks / "pope.parquet").to_pylist()
    ours = qwen_ckpt.model
    try:
        ours.set_pixel_budget(lmms_todre.QWEN_MIN_PIXELS, lmms_todre.QWEN_MAX_PIXELS)
        for sample in samples["pope_tiny"][:3]:
            row = rows[sample["doc_id"]]
            visual = ours.encode_image(media.open_image_bytes(row["image"]["bytes"], "row"))
            assert len(visual.tokens) >= 256  # the minimum: 200704 pixels, 784 a token
            question = row["question"].strip() + SHORT
            reply = model.ask(ours, qwen_ckpt.tokenizer, question, visual, configs.parse_config("full"), 128)
            logged = sample["filtered_resps"]
            assert (logged[0] if isinstance(logged, list) else logged) == reply.text.strip()  # as lmms-eval logs it
    finally:
        ours.set_pixel_budget(*QWEN_PIXELS)

    image = noise_image(200, 150)

    class Request:
        args = ("<image>\nIs it red?", "yes", lambda doc: [image], 0, "t", "s")

    low, high = QWEN_PIXELS
    arguments = f"pretrained={qwen_ckpt.directory},config=full,dtype=float32,min_pixels={low},max_pixels={high}"
    lmm = lmms_todre.ToDRE.create_from_arg_string(arguments)
    lmm.task_dict = {"t": {"s": {0: {}}}}
    ((logprob, greedy),) = lmm.loglikelihood([Request()])
    inputs = qwen_ckpt.hf_inputs(image, "\nIs it red?")  # "<image>" removed, the image first
    cont = torch.tensor(qwen_ckpt.tokenizer.encode("yes", add_special_tokens=False).ids)
    n = inputs["input_ids"].shape[1]
    inputs["input_ids"] = torch.cat([inputs["input_ids"], cont[None]], dim=1)
    no_image = torch.zeros(1, len(cont), dtype=torch.int)
    inputs["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], no_image], 1)
    with torch.inference_mode():
        logits = qwen_ckpt.hf(**inputs).logits[0, n - 1 : -1].log_softmax(-1)
    assert logprob == pytest.approx(float(logits.gather(-1, cont[:, None]).sum()), abs=1e-4)
    assert greedy == bool((logits.argmax(-1) == cont).all())


def test_qwen_only_arguments_and_answers_cut_as_lmms_evals_qwen(mha):
    with pytest.raises(lmms_todre.UsageError, match="min_pixels and max_pixels apply to Qwen2.5-VL"):
        lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=full,max_pixels=100000")
    with pytest.raises(lmms_todre.UsageError, match="max_pixels must be a whole number of pixels"):
        lmms_todre.ToDRE.create_from_arg_string(f"pretrained={mha.directory},config=full,max_pixels=1e6")

    class Request:
        args = ("q", {"until": ["\n\n", "STOP"]})

    assert lmms_todre.cut(" A\n\nB STOP C", Request()) == "A"  # llava: cut at the first stop, stripped
    assert lmms_todre.cut(" A\n\nB STOP C", Request(), qwen=True) == " A\n\nB "  # qwen2_5_vl: "\n\n" is not one
