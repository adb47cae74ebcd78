"""scoring.py: each benchmark's reference reading of an answer, one case per branch, and its
metrics on hand-checked sets. Expected values are those of the reference scripts (LLaVA's
eval_pope.py, eval_science_qa.py, m4c_evaluator.py and convert_gqa_for_eval.py, MME's
calculation.py, VLMEvalKit's can_infer and circular evaluation), worked by hand from their code."""

import pytest

from evaluation import scoring

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
    assert scoring.parse_pope_llava(answer) == expected


@pytest.mark.parametrize(
    "answer, expected", [("Yes", "yes"), (" no \n", "no"), ("Yes.", "other"), ("yes, there is", "other"), ("", "other")]
)
def test_pope_lmms_eval_parser_is_an_exact_match(answer, expected):
    assert scoring.parse_exact_yes_no(answer) == expected


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
def test_mme_lmms_eval_parser(answer, expected):
    assert scoring.parse_mme_lmms_eval(answer) == expected


def test_normalize_for_exact_match():
    assert scoring.normalize("  The  Eiffel Tower. ") == "the eiffel tower"
    assert scoring.normalize('"2"') == "2"


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
    metrics = scoring.pope_metrics(random + popular + adversarial)
    assert metrics["random"] == pytest.approx(
        {"accuracy": 3 / 5, "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5}
    )
    assert metrics["popular"] == {"accuracy": 0.5, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    assert metrics["adversarial"] == pytest.approx(
        {"accuracy": 0.5, "precision": 1.0, "recall": 1.0, "f1": 1.0, "yes_ratio": 0.25}
    )
    assert metrics["mean_f1"] == pytest.approx((2 / 3 + 0 + 1) / 3)
    assert list(metrics) == ["random", "popular", "adversarial", "mean_f1", "column"]
    assert metrics["column"] == pytest.approx(100 * metrics["mean_f1"])  # the paper's POPE number


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
    metrics = scoring.mme_metrics(rows)
    assert metrics["existence"] == {"acc": 0.75, "acc_plus": 0.5, "score": 125.0}
    assert metrics["code_reasoning"] == {"acc": 1.0, "acc_plus": 1.0, "score": 200.0}
    assert (metrics["perception"], metrics["cognition"]) == (125.0, 200.0) and metrics["column"] == 125.0
    assert len(metrics["missing"]) == 12 and "OCR" in metrics["missing"] and "existence" not in metrics["missing"]


def test_jsonl_metrics_yes_no_like_pope_and_short_answers_by_exact_match():
    yes_no = records("all", [("yes", "Yes"), ("no", "yes")])
    assert scoring.exact_match_metrics([{**r, "label": r["label"].lower()} for r in yes_no])[
        "mean_f1"
    ] == pytest.approx(2 / 3)
    short = records("cars", [("red", "Red."), ("blue", "green")]) + records("signs", [("stop", "STOP")])
    assert scoring.exact_match_metrics(short) == {
        "cars": {"accuracy": 0.5},
        "signs": {"accuracy": 1.0},
        "accuracy": 2 / 3,
        "column": pytest.approx(200 / 3),
    }


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("yes", "yes"),
        ("No", "no"),  # lowered
        ("Yes, there is.", "yes"),  # yes within the first 4 characters
        ("Nope", "no"),
        ("The answer is yes", "other"),  # only the first 4 characters are read
        ("y", "other"),  # MME's own tool has no single-letter rule (lmms-eval's has)
        ("", "other"),
    ],
)
def test_mme_parser_is_mmes_calculation_py(answer, expected):
    assert scoring.parse_mme(answer) == expected


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("B", "B"),
        ("E", "E"),  # any of A-E; whether E is an option is the scorer's business
        ("A. Maryland", "A"),  # letter, period, space
        ("A.", "FAILED"),  # no space after the period
        ("(A)", "FAILED"),
        ("a", "FAILED"),
        ("The answer is B.", "B"),
        ("The answer is B", "FAILED"),  # the pattern wants a character after the letter
        ("The answer is B. The answer is C.", "FAILED"),  # two hits
        ("I think it is B", "FAILED"),
    ],
)
def test_science_qa_parser_is_llavas(answer, expected):
    assert scoring.parse_science_qa(answer) == expected


def test_science_qa_scores_img_accuracy_and_refuses_letters_past_the_choices():
    def record(pred, label, n, image):
        return {"pred": pred, "label": label, "choices": ["x"] * n, "image": image}

    records = [
        record("B", "B", 2, "1.png"),  # right, with an image
        record("C", "C", 2, "2.png"),  # C is not among 2 choices: wrong even though it equals the label
        record("A", "A", 3, None),  # right, text-only
        record("FAILED", "A", 2, "3.png"),
    ]
    metrics = scoring.science_qa_metrics(records)
    assert metrics["accuracy"] == 0.5 and metrics["img_accuracy"] == pytest.approx(1 / 3)
    assert metrics["column"] == pytest.approx(100 / 3) and metrics["img_questions"] == 3 and metrics["failed"] == 1


CHOICES = {"A": "cat", "B": "dog", "C": "bird"}


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("A", "A"),
        ("(B)", "B"),
        ("The answer is B.", "B"),
        ("A cat is on the mat", "A"),  # "A" stands as a word: VLMEvalKit reads it as the letter
        ("cat", "A"),  # no letter: the one option text inside the answer
        ("The dog", "B"),
        ("dog and cat", None),  # two option texts: unreadable (a GPT judge's case; wrong here)
        ("E", None),  # not an option of this question
        ("Z", "Z"),
        ("Cannot determine the answer", "Z"),
        ("B or C", None),
    ],
)
def test_mmbench_reading_is_vlmevalkits_can_infer(answer, expected):
    assert scoring.parse_mmbench(answer, dict(CHOICES)) == expected


def test_mmbench_circular_counts_a_question_only_if_every_copy_is_right():
    def row(index, pred, label, category="ocr"):
        return {"index": index, "pred": pred, "label": label, "category": category}

    records = [
        row(0, "A", "A"), row(1_000_000, "B", "B"),  # 2 copies, both right: hit
        row(1, "C", "C"), row(1_000_001, "A", "D"), row(2_000_001, "B", "B"),  # one copy wrong: miss
        row(2, None, "A", "color"), row(1_000_002, "B", "B", "color"),  # an unreadable copy: miss
        row(3, "D", "D", "color"),  # no copies in the data: judged alone
    ]  # fmt: skip
    metrics = scoring.mmbench_metrics(records)
    assert metrics["circular_accuracy"] == 0.5 and metrics["column"] == 50.0 and metrics["questions"] == 4
    assert metrics["first_copy_accuracy"] == 0.75  # rows 0, 1, 3 of 0..3 right
    assert metrics["by_category"] == {"color": 0.5, "ocr": 0.5} and metrics["unreadable"] == 1


@pytest.mark.parametrize(
    "answer, expected",
    [
        ("Two", "2"),
        ("The dog.", "dog"),
        ("Macy's", "macy 's"),
        ("08/13/2011", "08 13 2011"),
        ("t-shirt", "t shirt"),
        ("1,000", "1000"),  # a digit,digit comma: punctuation is deleted, not spaced
        ("U.S.A.", "usa"),
        ("It's a dog", "it 's dog"),
        ("None", "0"),
        ("dont", "don't"),
        ("Yes!", "yes"),
        ("3.5", "3.5"),  # a period before a digit stays
        ("  Unanswerable\n", "unanswerable"),
    ],
)
def test_evalai_normalisation_is_llavas_m4c_processor(answer, expected):
    assert scoring.evalai_answer(answer) == expected


def test_evalai_normalisation_removes_at_most_32_periods():
    assert scoring.evalai_answer("." * 40) == "." * 8  # the reference passes re.UNICODE (32) as the count


@pytest.mark.parametrize(
    "prediction, answers, expected",
    [
        ("2", ["2"] * 10, 1.0),
        ("two", ["2"] * 10, 1.0),  # both sides normalised
        ("2", ["2"] * 3 + ["3"] * 7, 0.9),  # 3 humans: 7 subsets see all 3 (1.0), 3 see 2 (2/3)
        ("2", ["2"] * 2 + ["3"] * 8, 0.6),  # 8 subsets see 2 (2/3), 2 see 1 (1/3)
        ("cat", ["dog"] * 10, 0.0),
        ("The dog.", ["dog"] * 4 + ["puppy"] * 6, 1.0),
    ],
)
def test_vqa_accuracy_is_the_ten_choose_nine_average(prediction, answers, expected):
    assert scoring.vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_vqa_metrics_without_human_answers_leave_the_column_to_evalai():
    assert scoring.vqa_metrics([{"answer": "2", "answers": None}])["column"] is None
    metrics = scoring.vqa_metrics([{"answer": "2", "answers": ["2"] * 10}, {"answer": "x", "answers": ["2"] * 10}])
    assert metrics == {"accuracy": 0.5, "column": 50.0}


def test_gqa_reads_as_llavas_converter_and_splits_binary_from_open():
    assert scoring.gqa_prediction("Yes.") == "yes" and scoring.gqa_prediction("T-shirt..") == "t-shirt"
    records = [
        {"pred": "yes", "label": "yes", "structural": "verify"},
        {"pred": "woman", "label": "woman", "structural": "query"},
        {"pred": "red", "label": "blue", "structural": "query"},
        {"pred": "no", "label": "yes", "structural": "logical"},
    ]
    metrics = scoring.gqa_metrics(records)
    assert metrics == {"accuracy": 0.5, "binary": 0.5, "open": 0.5, "column": 50.0}
