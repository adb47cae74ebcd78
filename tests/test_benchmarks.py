"""benchmarks.py: every benchmark read from LLaVA's evaluation layout and from lmms-lab's parquet
copies, with the prompts LLaVA's scripts send, and the data errors people run into. The tiny
data sets are built in conftest.py (make_llava_eval, make_hub_copies)."""

import json
import os
from pathlib import Path

import pytest

from conftest import LETTER, SHORT, fake_hub, make_hub_copies, make_llava_eval
from evaluation import benchmarks
from evaluation.benchmarks import BENCHMARKS, DataError, load_questions


@pytest.fixture(scope="module")
def llava_eval(tmp_path_factory):
    return make_llava_eval(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def hub(llava_eval, tmp_path_factory):
    return make_hub_copies(llava_eval, tmp_path_factory.mktemp("hub"))


def questions(name, data, images=None, split=None):
    return load_questions(BENCHMARKS[name], data, images, split)


# ---------------------------------------------------------------------------------------------
# LLaVA's layout: the prompts its scripts send
# ---------------------------------------------------------------------------------------------


def test_pope_takes_llavas_prompts_and_labels_each_category_by_position(llava_eval):
    qs = questions("pope", llava_eval)
    assert [q.category for q in qs] == ["adversarial"] * 3 + ["random"] * 3 + ["popular"] * 3  # the file's order
    assert qs[3].question_id == "10000001" and qs[3].source_id == 10000001
    assert qs[0].text == "Is there a dog in the image?" + SHORT
    assert [q.label for q in qs[:3]] == ["yes", "no", "yes"]  # the n-th line of coco_pope_adversarial.json
    assert qs[0].image.endswith("pope/val2014/COCO_val2014_000000000000.jpg")


def test_pope_original_layout_still_works_with_images_given(llava_eval):
    qs = questions("pope", llava_eval / "pope" / "coco", llava_eval / "pope" / "val2014")
    assert len(qs) == 9 and qs[0].text.endswith(SHORT) and {q.question_id for q in qs} == {"1", "2", "3"}


def test_mme_drops_please_answer_yes_or_no_for_the_short_answer_suffix(llava_eval):
    qs = questions("mme", llava_eval)
    by_id = {q.key: q for q in qs}
    art = by_id[("artwork", "artwork/10002.jpg/1")]
    assert art.text == "Is this artwork created by Titian?" + SHORT and art.label == "yes"
    assert art.source_id == "artwork/images/10002.jpg"  # llava_mme.jsonl's question_id: the image path
    assert by_id[("OCR", "OCR/0001.png/2")].source_id == "OCR/0001.png" and len(qs) == 6


def test_science_qa_asks_text_only_questions_without_an_image(llava_eval):
    qs = {q.question_id: q for q in questions("sqa", llava_eval)}
    assert qs["11"].text == "What is shown?\nA. Maryland\nB. Vermont" + LETTER and qs["11"].image.endswith(
        "11/image.png"
    )
    assert qs["26"].image is None and qs["26"].text.startswith("Context: Select the better estimate.\nHow long?")
    assert (qs["11"].label, qs["11"].choices) == ("B", ["Maryland", "Vermont"])
    assert BENCHMARKS["sqa"].max_new_tokens == 1024


def test_science_qa_without_problems_json_reads_the_answer_letter_of_llavas_file(llava_eval, tmp_path):
    import shutil

    copy = tmp_path / "scienceqa"
    shutil.copytree(llava_eval / "scienceqa", copy)
    (copy / "problems.json").unlink()
    with_problems = questions("sqa", llava_eval)
    without = questions("sqa", copy)
    assert [(q.label, q.choices) for q in without] == [(q.label, q.choices) for q in with_problems]


def test_gqa_answers_and_structural_types_come_from_gqas_own_questions(llava_eval):
    qs = questions("gqa", llava_eval)
    assert [(q.label, q.extra["structural"]) for q in qs] == [("no", "verify"), ("woman", "query"), ("red", "query")]
    assert qs[0].image == qs[1].image != qs[2].image and qs[0].text == "Is it overcast?" + SHORT


def test_mmbench_prompt_is_hint_question_options_and_the_letter_instruction(llava_eval):
    qs = questions("mmbench", llava_eval)
    assert qs[0].text == "A hint.\nWhich is it 0?\nA. rubber\nB. cotton" + LETTER
    assert qs[0].choices == ["rubber", "cotton"] and qs[0].label == "A"
    assert qs[2].text == "Which is it 1?\nA. red\nB. green\nC. blue\nD. black" + LETTER  # hint "nan": absent
    groups = {q.group for q in qs}
    assert groups == {"0", "1"} and len(qs) == 6  # 2 + 4 rotated copies
    assert qs[0].image_key == qs[1].image_key != qs[2].image_key  # copies share one image (one encode)
    cn = questions("mmbench_cn", llava_eval)
    assert cn[0].text.endswith("\n请直接回答选项字母。")


def test_vizwiz_and_vqav2_default_to_the_test_split_when_llavas_files_are_there(llava_eval):
    test = questions("vizwiz", llava_eval)
    assert test[0].answers is None and "respond with 'Unanswerable'." in test[0].text
    val = questions("vizwiz", llava_eval, split="val")
    assert (
        val[0].text
        == "What is this 0?\nWhen the provided information is insufficient, respond with 'Unanswerable'." + SHORT
    )
    assert val[0].answers == ["dog"] * 4 + ["cat"] * 6
    vqa = questions("vqav2", llava_eval, split="val")
    assert vqa[0].text == "How many 0?" + SHORT and vqa[0].image.endswith("COCO_val2014_000000000001.jpg")
    assert questions("vqav2", llava_eval)[0].question_id == "262144000"


# ---------------------------------------------------------------------------------------------
# lmms-lab's parquet copies give the same questions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, split",
    [
        ("pope", None),
        ("mme", None),
        ("sqa", None),
        ("gqa", None),
        ("mmbench", None),
        ("mmbench_cn", None),
        ("vizwiz", "val"),
        ("vqav2", "val"),
    ],
)
def test_hub_parquet_gives_llavas_prompts_and_labels(llava_eval, hub, monkeypatch, name, split):
    calls = fake_hub(monkeypatch, hub)
    local = questions(name, llava_eval, split=split)
    if name == "sqa":
        local = [q for q in local if q.image is not None]  # lmms-lab's ScienceQA-IMG: the image questions
    remote = questions(name, None, split=split)
    assert calls and calls[0]["repo_type"] == "dataset" and calls[0]["repo_id"] == BENCHMARKS[name].hub[0]

    def seen(qs):
        return sorted((q.category, q.text, q.label, tuple(q.answers or ()), tuple(q.choices or ())) for q in qs)

    assert seen(remote) == seen(local)
    embedded = benchmarks.EmbeddedImages()
    for q in remote:
        assert embedded.read(q)  # every question's image bytes are there
    if name in ("pope", "gqa", "mmbench"):
        assert len({q.image_key for q in remote}) == len({q.image_key for q in local})  # shared images stay shared


def test_hub_without_pyarrow_or_offline_is_one_clear_error(hub, monkeypatch):
    import sys

    from huggingface_hub.errors import LocalEntryNotFoundError

    fake_hub(monkeypatch, hub)
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(DataError, match=r"reading lmms-lab/POPE needs pyarrow: pip install pyarrow"):
        questions("pope", None)
    monkeypatch.undo()

    def offline(**kwargs):
        raise LocalEntryNotFoundError("offline")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(DataError, match="if you are offline, use a local copy"):
        questions("gqa", None)


# ---------------------------------------------------------------------------------------------
# --limit, and files that are not what they claim
# ---------------------------------------------------------------------------------------------


def test_limit_keeps_the_first_n_of_every_category_with_whole_groups(llava_eval):
    pope = benchmarks.limit(questions("pope", llava_eval), 1)
    assert [(q.category, q.question_id) for q in pope] == [
        ("adversarial", "1"),
        ("random", "10000001"),
        ("popular", "20000001"),
    ]
    mme = benchmarks.limit(questions("mme", llava_eval), 1)
    assert sorted(q.question_id for q in mme) == [
        "OCR/0001.png/1",
        "OCR/0001.png/2",
        "artwork/10002.jpg/1",
        "artwork/10002.jpg/2",
    ]
    mmbench = benchmarks.limit(questions("mmbench", llava_eval), 1)
    assert sorted(int(q.question_id) for q in mmbench) == [0, 1, 1_000_000, 1_000_001, 2_000_001, 3_000_001]


def test_a_repeated_question_id_is_refused_naming_both_lines(tmp_path):
    rows = [{"question_id": "q1", "image": "a.png", "question": "x?", "answer": "yes"}] * 2
    (tmp_path / "set.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match=r"set.jsonl:2: question 'q1' \(all\) is already at .*set.jsonl:1"):
        questions("jsonl", tmp_path / "set.jsonl")


def test_an_empty_question_file_is_an_error(tmp_path):
    (tmp_path / "set.jsonl").write_text("\n")
    with pytest.raises(DataError, match="holds no questions"):
        questions("jsonl", tmp_path / "set.jsonl")


def test_lines_split_at_line_feeds_only_and_a_bom_is_dropped(tmp_path):
    rows = [{"question_id": "q1", "image": "a.png", "question": "one\u2028two\u0085three", "answer": "yes"}]
    (tmp_path / "set.jsonl").write_bytes(
        b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode()
    )
    (q,) = questions("jsonl", tmp_path / "set.jsonl")
    assert q.text == "one\u2028two\u0085three" + SHORT


@pytest.mark.parametrize(
    "content, message",
    [
        ("[" * 100000, "JSON this reader refuses"),
        ('{"a": 1' + "0" * 5000 + "}", "JSON this reader refuses"),
        ("{not json", "not valid JSON"),
    ],
)
def test_json_that_python_refuses_is_a_data_error_naming_the_line(tmp_path, content, message):
    (tmp_path / "set.jsonl").write_text(content + "\n")
    with pytest.raises(DataError, match=f"set.jsonl:1: {message}"):
        questions("jsonl", tmp_path / "set.jsonl")


def test_a_fifo_or_device_is_refused_instead_of_read(tmp_path):
    os.mkfifo(tmp_path / "set.jsonl")
    with pytest.raises(DataError, match="is not a regular file"):
        benchmarks.read_text(tmp_path / "set.jsonl")
    with pytest.raises(DataError, match="/dev/zero is not a regular file"):
        benchmarks.read_text(Path("/dev/zero"))


def test_image_paths_may_not_leave_the_images_folder(tmp_path, llava_eval):
    rows = [{"question_id": "q1", "image": "../secret.png", "question": "x?", "answer": "yes"}]
    (tmp_path / "set.jsonl").write_text(json.dumps(rows[0]) + "\n")
    (tmp_path / "images").mkdir()
    with pytest.raises(DataError, match=r"image '../secret.png' is outside the images folder"):
        questions("jsonl", tmp_path / "set.jsonl", tmp_path / "images")
    assert questions("jsonl", tmp_path / "set.jsonl")[0].image == str(tmp_path / "../secret.png")  # no --images
    (tmp_path / "images" / "link.png").symlink_to("/etc/passwd")
    rows[0]["image"] = "link.png"
    (tmp_path / "set.jsonl").write_text(json.dumps(rows[0]) + "\n")
    with pytest.raises(DataError, match="outside the images folder"):
        questions("jsonl", tmp_path / "set.jsonl", tmp_path / "images")


def test_mme_finds_images_whatever_the_case_of_their_suffix(tmp_path):
    release = tmp_path / "MME_Benchmark_release_version" / "count"
    release.mkdir(parents=True)
    from conftest import save_image

    save_image(release / "0001.JPG", seed=1)
    (release / "0001.txt").write_text("Are there two? Please answer yes or no.\tYes\n")
    (q,) = questions("mme", tmp_path)
    assert q.image.endswith("0001.JPG") and q.question_id == "count/0001.JPG/1"


@pytest.mark.parametrize(
    "name, remove, message",
    [
        ("gqa", "gqa/data/testdev_balanced_questions.json", "needs llava_gqa_testdev_balanced.jsonl"),
        ("sqa", "scienceqa/llava_test_CQM-A.json", "has no llava_test_CQM-A.json"),
        ("mmbench", "mmbench/mmbench_dev_20230712.tsv", "has no mmbench_dev_20230712.tsv"),
        ("pope", "pope/coco", "has none of coco_pope_adversarial.json"),
    ],
)
def test_a_missing_file_says_what_to_download_and_where(llava_eval, tmp_path, name, remove, message):
    import shutil

    shutil.copytree(llava_eval, tmp_path / "eval")
    target = tmp_path / "eval" / remove
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(DataError, match=message):
        questions(name, tmp_path / "eval")


def test_pope_with_a_category_file_missing_is_refused(tmp_path, llava_eval):
    import shutil

    shutil.copytree(llava_eval / "pope", tmp_path / "pope")
    (tmp_path / "pope" / "coco" / "coco_pope_popular.json").unlink()
    with pytest.raises(DataError, match="lacks coco_pope_popular.json: POPE's score is the mean over its 3 categories"):
        questions("pope", tmp_path)


def test_a_parquet_row_without_image_bytes_is_one_line_naming_it(tmp_path, monkeypatch):
    from conftest import write_parquet

    row = {"question_id": "1", "question": "Is there a dog?", "answer": "yes", "category": "random", "image": None}
    write_parquet(tmp_path / "lmms-lab_POPE" / "data" / "test-00000-of-00001.parquet", [row])
    fake_hub(monkeypatch, tmp_path)
    (q,) = questions("pope", None)
    with pytest.raises(
        DataError, match=r"test-00000-of-00001.parquet \(row group 0, row 0\): the image column holds no"
    ):
        benchmarks.EmbeddedImages().read(q)


# ---------------------------------------------------------------------------------------------
# Real files nobody here wrote: the readings LLaVA's own code makes
# ---------------------------------------------------------------------------------------------


def test_mmbench_tsv_cells_equal_pandas_read_table_on_files_pandas_writes(tmp_path):
    """MMBench's dev TSV is written by pandas: a cell holding a line break, a tab or a quote is
    quoted, quotes doubled. LLaVA reads it with pandas.read_table; every cell must come out the same."""
    import pandas

    cells = [
        "plain",
        "a hint\nover two lines",
        'she said "hi"',
        "a\ttab",
        '"quoted at the start" then more',
        "trailing space ",
        "",
        "x\r\ny",
        "nan",
    ]
    frame = pandas.DataFrame({"index": range(len(cells)), "hint": cells, "question": cells[::-1], "A": "a", "B": "b"})
    frame.to_csv(tmp_path / "mmbench.tsv", sep="\t", index=False)
    (tmp_path / "blank_lines.tsv").write_text('index\tq\n\n0\t"one\n\ntwo"\n\n1\tlast\n')
    (tmp_path / "unquoted.tsv").write_text('index\tq\n0\ta "quote" inside\n1\t2 inch"\n')
    for name in ("mmbench.tsv", "blank_lines.tsv", "unquoted.tsv"):
        expected = pandas.read_table(tmp_path / name, keep_default_na=False, dtype=str)
        rows = benchmarks.tsv_rows(tmp_path / name)
        assert rows[0][1] == list(expected.columns)
        assert [cells for _, cells in rows[1:]] == expected.values.tolist(), name
    assert [number for number, _ in benchmarks.tsv_rows(tmp_path / "blank_lines.tsv")] == [1, 3, 7]  # where rows start


def test_mmbench_reads_a_pandas_written_tsv_with_multi_line_hints_and_quotes(llava_eval, tmp_path):
    import pandas

    source = llava_eval / "mmbench" / "mmbench_dev_20230712.tsv"
    frame = pandas.read_table(source, keep_default_na=False, dtype=str)
    frame.loc[0, "hint"] = 'A hint\nover "two" lines.'
    (tmp_path / "mmbench").mkdir()
    frame.to_csv(tmp_path / "mmbench" / "mmbench_dev_20230712.tsv", sep="\t", index=False)
    qs = questions("mmbench", tmp_path)
    assert len(qs) == len(frame) and qs[0].text.startswith('A hint\nover "two" lines.\nWhich is it 0?')


def test_mme_prompts_equal_llavas_whatever_the_spacing_before_the_instruction(tmp_path):
    """7 MME questions have two spaces before "Please answer yes or no."; llava_mme.jsonl's text
    has no space left before the short-answer suffix, as for the others."""
    folder = tmp_path / "MME" / "count"
    folder.mkdir(parents=True)
    (folder / "1.jpg").write_bytes(b"")
    (folder / "1.txt").write_text(
        "Are there two dogs?  Please answer yes or no.\tYes\nAre there three dogs? Please answer yes or no.\tNo\n"
    )
    qs = questions("mme", tmp_path)
    assert [q.text for q in qs] == ["Are there two dogs?" + SHORT, "Are there three dogs?" + SHORT]


@pytest.mark.parametrize(
    "name, edit, message",
    [
        ("vqav2", ("v2_OpenEnded_mscoco_val2014_questions.json", "image_id", "abc"), "image_id must be a whole number"),
        ("vqav2", ("v2_OpenEnded_mscoco_val2014_questions.json", "image_id", None), "image_id must be a whole number"),
        ("vizwiz", ("val.json", "answers", 7), "answers must be a list, got int"),
    ],
)
def test_reference_files_with_wrong_field_types_are_one_line(llava_eval, tmp_path, name, edit, message):
    import shutil

    shutil.copytree(llava_eval / name, tmp_path / name)
    file, field, value = edit
    data = json.loads((tmp_path / name / file).read_text())
    (data["questions"] if isinstance(data, dict) else data)[0][field] = value
    (tmp_path / name / file).write_text(json.dumps(data))
    with pytest.raises(DataError, match=message):
        questions(name, tmp_path, split="val")


def test_science_qa_problems_that_are_not_an_object_are_one_line(llava_eval, tmp_path):
    import shutil

    shutil.copytree(llava_eval / "scienceqa", tmp_path / "scienceqa")
    (tmp_path / "scienceqa" / "problems.json").write_text("[1, 2]")
    with pytest.raises(DataError, match="problems.json: expected ScienceQA's JSON object"):
        questions("sqa", tmp_path)


def test_a_parquet_without_an_image_column_or_too_large_is_one_line(tmp_path, monkeypatch):
    from conftest import write_parquet

    row = {"question_id": "1", "question": "Is there a dog?", "answer": "yes", "category": "random"}
    write_parquet(tmp_path / "lmms-lab_POPE" / "data" / "test-00000-of-00001.parquet", [row])
    fake_hub(monkeypatch, tmp_path)
    with pytest.raises(DataError, match="has no image column"):
        questions("pope", None)
    write_parquet(tmp_path / "lmms-lab_POPE" / "data" / "test-00000-of-00001.parquet", [{**row, "image": None}])
    monkeypatch.setattr(benchmarks, "MAX_ROW_GROUP_BYTES", 10)  # a row group declaring more than the reader takes
    with pytest.raises(DataError, match=r"row group 0 decompresses to \d+ MiB, more than this reader takes"):
        questions("pope", None)


def test_limit_is_linear_in_the_questions(monkeypatch):
    """--limit keeps a set of the groups it chose: membership checks do not grow with the groups."""
    qs = [benchmarks.Question(str(i), "c", "q", None, "w", group=str(i // 2)) for i in range(40_000)]
    kept = benchmarks.limit(qs, 15_000)
    assert [q.question_id for q in kept] == [str(i) for i in range(30_000)]
