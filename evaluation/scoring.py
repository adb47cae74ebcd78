"""How each benchmark's reference scorer reads an answer and scores a set of answers.

Pure functions on strings and lists, with no model and no files, so a score here equals what the
benchmark's own script computes on the same answers. Each function names the script it mirrors:
LLaVA's (haotian-liu/LLaVA `llava/eval/*.py`, `scripts/convert_*_for_*.py`), MME's
`eval_tool/calculation.py`, GQA's `eval.py`, VLMEvalKit's MMBench circular evaluation, and
lmms-eval's readings where a flag asks for them. Rates are fractions (0-1); `column` values are
on the scale the paper's tables print (MME as its raw score, the rest x 100).
"""

import re


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def by_category(records: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for record in records:
        groups.setdefault(record["category"], []).append(record)
    return groups


# ---------------------------------------------------------------------------------------------
# Yes/no: POPE and MME
# ---------------------------------------------------------------------------------------------


def parse_pope_llava(answer: str) -> str:
    """LLaVA's eval_pope.py: the text before the first '.', commas removed, split on spaces; any of
    the words No, not, no makes it "no", anything else "yes" (so "NO" and "" count as yes)."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def parse_exact_yes_no(answer: str) -> str:
    """lmms-eval's POPE: the answer lowered and stripped must be exactly yes or no, else "other"."""
    text = answer.lower().strip()
    return text if text in ("yes", "no") else "other"


def parse_mme(answer: str) -> str:
    """MME's eval_tool/calculation.py (what LLaVA's mme.sh runs): lowered; exactly yes or no, else
    yes or no within the first 4 characters, else "other" (counted wrong)."""
    text = answer.lower()
    if text in ("yes", "no"):
        return text
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def parse_mme_lmms_eval(answer: str) -> str:
    """lmms-eval's MME (from Otter): lowered, stripped, '.' dropped; exactly yes/no, or y/n alone,
    else yes or no within the first 4 characters, else "other"."""
    text = answer.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def yes_no_metrics(records: list[dict]) -> dict:
    """LLaVA's eval_pope.py on one category: accuracy, precision, recall and F1 of "yes", and the
    share of "yes" predictions; a ratio whose denominator is 0 is 0. An unparseable prediction
    ("other", lmms-eval's reader only) is wrong and counts in no cell of the confusion matrix."""
    pairs = [(r["pred"], r["label"]) for r in records]
    tp = sum(p == "yes" and y == "yes" for p, y in pairs)
    fp = sum(p == "yes" and y == "no" for p, y in pairs)
    fn = sum(p == "no" and y == "yes" for p, y in pairs)
    precision, recall = ratio(tp, tp + fp), ratio(tp, tp + fn)
    return {
        "accuracy": ratio(sum(p == y for p, y in pairs), len(pairs)),
        "precision": precision,
        "recall": recall,
        "f1": ratio(2 * precision * recall, precision + recall),
        "yes_ratio": ratio(sum(p == "yes" for p, _ in pairs), len(pairs)),
    }


def pope_metrics(records: list[dict]) -> dict:
    """Per category (in the order met) accuracy, precision, recall, F1 and yes-ratio; `column` is
    the mean F1 over the categories x 100, the number the paper's POPE column holds."""
    metrics = {category: yes_no_metrics(group) for category, group in by_category(records).items()}
    mean_f1 = ratio(sum(m["f1"] for m in metrics.values()), len(metrics))
    return {**metrics, "mean_f1": mean_f1, "column": 100 * mean_f1}


MME_PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork")
MME_PERCEPTION += ("OCR",)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")


def mme_metrics(records: list[dict]) -> dict:
    """MME's calculation.py: per subtask acc (questions right) and acc+ (images with both questions
    right), score = 100 * (acc + acc+); perception and cognition sum the subtask scores present
    (`missing` lists the others). `column` is the perception total, the paper's MME number."""
    metrics = {}
    for subtask, group in sorted(by_category(records).items()):
        images = {}
        for r in group:
            images.setdefault(r["image"], []).append(r["pred"] == r["label"])
        acc = ratio(sum(sum(v) for v in images.values()), len(group))
        acc_plus = ratio(sum(all(v) for v in images.values()), len(images))
        metrics[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    perception = sum(metrics[s]["score"] for s in MME_PERCEPTION if s in metrics)
    cognition = sum(metrics[s]["score"] for s in MME_COGNITION if s in metrics)
    missing = [s for s in (*MME_PERCEPTION, *MME_COGNITION) if s not in metrics]
    return {**metrics, "perception": perception, "cognition": cognition, "missing": missing, "column": perception}


# ---------------------------------------------------------------------------------------------
# Multiple choice: ScienceQA and MMBench
# ---------------------------------------------------------------------------------------------

LETTERS = "ABCDE"


def parse_science_qa(answer: str) -> str:
    """LLaVA's eval_science_qa.py: the answer itself if it is a letter A-E; else its first letter if
    followed by ". "; else the X of exactly one "The answer is X." (any character after X); else
    "FAILED". So "A." and "(A)" fail, and "The answer is B" at the very end fails too."""
    if answer in LETTERS:
        return answer
    if len(answer) >= 3 and answer[0] in LETTERS and answer[1:3] == ". ":
        return answer[0]
    found = re.findall(r"The answer is ([A-Z]).", answer)
    return found[0] if len(found) == 1 else "FAILED"


def science_qa_metrics(records: list[dict]) -> dict:
    """LLaVA's eval_science_qa.py: right when the parsed letter is among the question's first
    len(choices) letters and is the answer. `img_accuracy` counts the questions asked with an
    image (its IMG-Accuracy line); `column` is that x 100, the paper's ScienceQA number."""
    right = [r["pred"] in LETTERS[: len(r["choices"])] and r["pred"] == r["label"] for r in records]
    with_image = [ok for ok, r in zip(right, records, strict=True) if r["image"] is not None]
    img_accuracy = ratio(sum(with_image), len(with_image))
    return {
        "accuracy": ratio(sum(right), len(right)),
        "img_accuracy": img_accuracy,
        "img_questions": len(with_image),
        "failed": sum(r["pred"] == "FAILED" for r in records),
        "column": 100 * img_accuracy,
    }


def can_infer_option(answer: str, choices: dict) -> str | None:
    """VLMEvalKit's can_infer_option (matching_util.py): with .()[],:;!*#{} turned into spaces,
    exactly one option letter standing as a word is the answer; a refusal, or a lone "Z", is "Z"."""
    refusals = (
        "Sorry, I can't help with images of people yet.",
        "I can't process this file.",
        "I'm sorry, but without the image provided",
        "Cannot determine the answer",
    )
    if "Failed to obtain answer via API" in answer:
        return None
    if any(refusal in answer for refusal in refusals):
        return "Z"
    words = answer.translate(str.maketrans({c: " " for c in ".()[],:;!*#{}"})).split()
    found = [letter for letter in choices if letter in words]
    if len(found) == 1:
        return found[0]
    if not found and "Z" in words:
        return "Z"
    return None


def can_infer_text(answer: str, choices: dict) -> str | None:
    """VLMEvalKit's can_infer_text: the one option whose text (lowered) is inside the answer (lowered)."""
    found = [letter for letter, text in choices.items() if str(text).lower() in answer.lower()]
    return found[0] if len(found) == 1 else None


def parse_mmbench(answer: str, choices: dict) -> str | None:
    """VLMEvalKit's can_infer: the option letter, else the option text; None when neither reads
    (VLMEvalKit would then ask a GPT judge; with none, as here, the question counts as wrong)."""
    return can_infer_option(answer, choices) or can_infer_text(answer, choices)


def mmbench_metrics(records: list[dict]) -> dict:
    """VLMEvalKit's mcq_circular_eval: rows whose index is equal modulo 1,000,000 are one question
    with its options rotated; it counts (hit) only if every copy's letter is its answer. `column`
    is the circular overall x 100 (the paper's MMBench number); `first_copy_accuracy` reads only
    the unrotated copies; per category as VLMEvalKit reports it."""
    groups = {}
    for r in records:
        groups.setdefault(int(r["index"]) % 1_000_000, []).append(r)
    hits = {g: all(r["pred"] == r["label"] for r in rows) for g, rows in groups.items()}
    firsts = [r for r in records if int(r["index"]) < 1_000_000]
    categories = {}
    for g, rows in groups.items():
        categories.setdefault(rows[0]["category"], []).append(hits[g])
    overall = ratio(sum(hits.values()), len(hits))
    return {
        "circular_accuracy": overall,
        "first_copy_accuracy": ratio(sum(r["pred"] == r["label"] for r in firsts), len(firsts)),
        "questions": len(groups),
        "unreadable": sum(r["pred"] is None for r in records),
        "by_category": {c: ratio(sum(v), len(v)) for c, v in sorted(categories.items())},
        "column": 100 * overall,
    }


# ---------------------------------------------------------------------------------------------
# Short answers: GQA, VQAv2, VizWiz
# ---------------------------------------------------------------------------------------------


def gqa_prediction(answer: str) -> str:
    """LLaVA's scripts/convert_gqa_for_eval.py: trailing periods stripped, lowered."""
    return answer.rstrip(".").lower()


def gqa_metrics(records: list[dict]) -> dict:
    """GQA's eval.py on testdev-balanced: exact string match with the answer; Binary and Open split
    by the question's structural type ("query" is open), where the data gives it."""
    right = [r["pred"] == r["label"] for r in records]
    metrics = {"accuracy": ratio(sum(right), len(right))}
    typed = [(ok, r["structural"]) for ok, r in zip(right, records, strict=True) if r.get("structural")]
    if typed:
        open_ = [ok for ok, kind in typed if kind == "query"]
        binary = [ok for ok, kind in typed if kind != "query"]
        metrics.update(binary=ratio(sum(binary), len(binary)), open=ratio(sum(open_), len(open_)))
    return {**metrics, "column": 100 * metrics["accuracy"]}


# EvalAI's answer normalisation (LLaVA's m4c_evaluator.EvalAIAnswerProcessor, from mmf): contractions
# written without their apostrophe get it back ...
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
# ... number words up to ten become digits, articles go, and these characters are dropped or spaced.
NUMBER_WORDS = dict(none="0", zero="0", one="1", two="2", three="3", four="4", five="5", six="6", seven="7")
NUMBER_WORDS.update(eight="8", nine="9", ten="10")
ARTICLES = ("a", "an", "the")
PUNCTUATION = ';/[]"{}()=+\\_-><@`,?!'
PERIOD_NOT_IN_NUMBER = re.compile(r"(?!<=\d)(\.)(?!\d)")  # the reference's look-behind is malformed; kept
COMMA_IN_NUMBER = re.compile(r"(?<=\d)(\,)+(?=\d)")


def evalai_answer(answer: str) -> str:
    """EvalAI's VQA answer normalisation, as LLaVA's m4c_evaluator.EvalAIAnswerProcessor applies it
    (and its convert_vqav2/vizwiz_for_submission.py before upload): "Two" -> "2", "The dog." ->
    "dog", "Macy's" -> "macy 's", "08/13/2011" -> "08 13 2011"."""
    text = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    spaced = text
    for p in PUNCTUATION:
        # Deleted where it touches a space (or the text has a digit,digit comma), else a space.
        touches = p + " " in text or " " + p in text or COMMA_IN_NUMBER.search(text) is not None
        spaced = spaced.replace(p, "" if touches else " ")
    # The reference passes re.UNICODE (32) where `count` goes, so at most 32 periods are removed.
    spaced = PERIOD_NOT_IN_NUMBER.sub("", spaced, count=re.UNICODE)
    words = [NUMBER_WORDS.get(w, w) for w in spaced.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """The VQA soft accuracy, as LLaVA's TextVQAAccuracyEvaluator computes it: prediction and every
    human answer normalised by `evalai_answer`, then the mean over the humans i of
    min(1, (other humans who gave the prediction) / 3): the 10-choose-9 average of min(#matches/3, 1)."""
    prediction = evalai_answer(prediction)
    humans = [evalai_answer(a) for a in answers]
    matches = sum(h == prediction for h in humans)
    return ratio(sum(min(1.0, (matches - (h == prediction)) / 3) for h in humans), len(humans))


def vqa_metrics(records: list[dict]) -> dict:
    """Mean VQA accuracy over the questions that carry human answers (val splits); test splits
    carry none and are scored by the EvalAI server from the submission file (`column` None)."""
    scored = [vqa_accuracy(r["answer"], r["answers"]) for r in records if r.get("answers")]
    if not scored:
        return {"column": None, "note": "no reference answers in this split: upload the submission file to EvalAI"}
    accuracy = ratio(sum(scored), len(scored))
    return {"accuracy": accuracy, "column": 100 * accuracy}


# ---------------------------------------------------------------------------------------------
# Any set of short answers
# ---------------------------------------------------------------------------------------------


def normalize(answer: str) -> str:
    """For short answers: lowered, inner whitespace collapsed, surrounding punctuation stripped."""
    return " ".join(answer.lower().split()).strip(" .,;:!?\"'")


def exact_match_metrics(records: list[dict]) -> dict:
    """Yes/no sets are scored like POPE; any other set by normalised exact match, per category."""
    if all(r["label"].strip().lower() in ("yes", "no") for r in records):
        return pope_metrics(records)
    metrics = {
        category: {"accuracy": ratio(sum(r["pred"] == normalize(r["label"]) for r in group), len(group))}
        for category, group in sorted(by_category(records).items())
    }
    accuracy = ratio(sum(r["pred"] == normalize(r["label"]) for r in records), len(records))
    return {**metrics, "accuracy": accuracy, "column": 100 * accuracy}
