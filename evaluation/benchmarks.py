"""The benchmarks of the paper's Table 1, each as one entry: where its questions come from (LLaVA's
evaluation layout, the original release, or lmms-lab's parquet copy on the Hub), the prompt LLaVA's
evaluation sends, how its reference scorer reads and scores the answers, which table column it
fills, and what it uploads where a server scores it.

A question is a plain record (`Question`); a benchmark is a small class whose methods say all the
above, and `BENCHMARKS` lists them by name. evaluate.py knows none of them by name. Every file is
read with its path in the error message: a `DataError` names the file and the line.
"""

import base64
import binascii
import csv
import hashlib
import io
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import files
from evaluation import scoring
from files import FileProblem

# LLaVA's instruction suffixes, as its question files carry them (LLaVA docs/Evaluation.md, eval.zip).
SHORT_ANSWER = "\nAnswer the question using a single word or phrase."
LETTER_ANSWER = "\nAnswer with the option's letter from the given choices directly."
LETTER_ANSWER_CN = "\n请直接回答选项字母。"
UNANSWERABLE = "\nWhen the provided information is insufficient, respond with 'Unanswerable'."
MAX_JSON_BYTES = 2**31  # a question or answer file larger than this is not one


class DataError(Exception):
    """A benchmark file that cannot be used; the message names the file (and line) and what to do,
    `flag` the program's option that does it (the program adds it to the message)."""

    def __init__(self, message: str, flag: str | None = None):
        super().__init__(message)
        self.flag = flag


@dataclass
class Question:
    """One question of a benchmark, everything its prompt and its scorer need."""

    question_id: str  # unique within its category: (category, question_id) is the question's key
    category: str  # POPE split, MME subtask, MMBench category, or "default"
    text: str  # the user's words after the image placeholder, instruction suffix included
    image: str | None  # the image's path or name; None: asked without an image (ScienceQA text-only)
    source: str  # "file:line" (or parquet row) the question came from, for messages
    label: str | None = None  # the expected answer as the scorer compares it (yes/no, a letter, a word)
    answers: list[str] | None = None  # VQA: the human answers (10), scored by soft accuracy
    choices: list[str] | None = None  # multiple choice: the option texts, lettered A, B, ...
    source_id: object = None  # the id as the benchmark's own files write it (LLaVA's answers.jsonl)
    group: str | None = None  # questions that --limit keeps or drops together (MMBench copies, MME pairs)
    blob: object = None  # embedded image: (parquet file, row group, row) or base64 text; None: `image` is a path
    extra: dict = field(default_factory=dict)  # scorer-specific fields (MMBench index, GQA structural type)

    @property
    def key(self) -> tuple[str, str]:
        return self.category, self.question_id

    @property
    def image_key(self) -> str | None:
        """What identifies the image, so that every question about it shares one encode."""
        if isinstance(self.blob, str):
            return "sha1:" + hashlib.sha1(self.blob.encode()).hexdigest()
        return self.image


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def read_text(path: Path) -> str:
    """A UTF-8 text file (a BOM is dropped), refusing anything that is not a regular file: a FIFO
    would hang, /dev/zero would fill the memory."""
    try:
        return files.read_text(path, MAX_JSON_BYTES)
    except FileProblem as e:
        raise DataError(str(e)) from None


def lines(path: Path) -> list[str]:
    """The lines of a text file, split at line feeds only (a U+2028 inside a question is text)."""
    return [line.removesuffix("\r") for line in read_text(path).split("\n")]


def parse_json(text: str, where: str):
    """files.parse_json, its failures as DataErrors."""
    try:
        return files.parse_json(text, where)
    except FileProblem as e:
        raise DataError(str(e)) from None


def read_json(path: Path):
    return parse_json(read_text(path), str(path))


def tsv_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, cells) for every row of a tab-separated file, read as pandas.read_table reads
    it (LLaVA's model_vqa_mmbench does): a cell that starts with '"' is quoted and may hold tabs, line
    breaks and doubled quotes ("" for one); elsewhere a quote is text; blank lines are skipped."""
    reader = csv.reader(io.StringIO(read_text(path), newline=""), delimiter="\t", quotechar='"', doublequote=True)
    rows, first_line = [], 1
    try:
        for cells in reader:
            if cells:
                rows.append((first_line, cells))
            first_line = reader.line_num + 1
    except csv.Error as e:
        raise DataError(f"{path}:{first_line}: not a readable TSV row ({e})") from None
    return rows


def json_lines(path: Path):
    """(line number, JSON object) for every non-empty line of `path`."""
    for number, raw in enumerate(lines(path), start=1):
        if not raw.strip():
            continue
        record = parse_json(raw, f"{path}:{number}")
        if not isinstance(record, dict):
            raise DataError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
        yield number, record


def require(record: dict, names, where: str) -> dict:
    missing = [name for name in names if record.get(name) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    return record


def is_whole_number(value) -> bool:
    """An int, or a string of digits (JSON files write ids either way); not a bool, not null."""
    return (isinstance(value, int) and not isinstance(value, bool)) or (isinstance(value, str) and value.isdigit())


def answer_list(record: dict, where: str) -> list:
    """A question's reference answers, which must be a list (VQA's 10 answers)."""
    answers = record.get("answers")
    if not isinstance(answers, list):
        raise DataError(f"{where}: answers must be a list, got {type(answers).__name__}")
    return answers


def first_existing(*paths: Path) -> Path | None:
    return next((p for p in paths if p is not None and p.exists()), None)


def in_folder(folder: Path, name: str, where: str, confined: bool) -> str:
    """The path of image `name` in `folder`. Confined (--images given): a name that leads out of
    the folder (absolute, ../, a link pointing out) is refused, so a question file cannot make
    this program read any file on the machine."""
    path = folder / name
    if confined:
        root = os.path.realpath(folder)
        if os.path.commonpath([root, os.path.realpath(path)]) != root:
            raise DataError(f"{where}: image {name!r} is outside the images folder {folder}")
    return str(path)


def subfolder(data: Path, name: str) -> Path:
    """LLaVA's layout keeps each benchmark in playground/data/eval/<name>/: --data may be that root
    or the benchmark's own folder."""
    return data / name if (data / name).is_dir() else data


# ---------------------------------------------------------------------------------------------
# The Hub's parquet copies (lmms-lab), images embedded
# ---------------------------------------------------------------------------------------------


def download(repo: str, patterns: list[str]) -> Path:
    """The dataset's files matching `patterns`, downloaded (or found in the Hub cache)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        return Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=patterns))
    except RepositoryNotFoundError:
        raise DataError(f"{repo} is not on the Hugging Face Hub any more: use a local copy", "--data DIR") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise DataError(
            f"cannot download {repo} from the Hugging Face Hub ({type(e).__name__}); "
            "if you are offline, use a local copy",
            "--data DIR",
        ) from None


def parquet_rows(repo: str, folder: Path, pattern: str, columns=None, images: bool = True):
    """(where, file, row group, row, record) for every row of the parquet files matching `pattern`,
    without their images (those are read one row group at a time while answering); `images`: the
    files must have an image column (GQA keeps its questions and its images in separate files)."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {repo} needs pyarrow: pip install pyarrow (or use a local copy)", "--data DIR"
        ) from None
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{repo} has no {pattern} files in {folder}")
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            if images and "image" not in parquet.schema_arrow.names:
                raise DataError(f"{path} has no image column: not one of lmms-lab's copies of {repo}")
            names = [c for c in parquet.schema_arrow.names if c != "image" and (columns is None or c in columns)]
            for group in range(parquet.num_row_groups):
                check_row_group_size(parquet, group, path)
                for row, record in enumerate(parquet.read_row_group(group, columns=names).to_pylist()):
                    yield f"{path} (row group {group}, row {row})", str(path), group, row, record
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a readable parquet file ({e})") from None


MAX_ROW_GROUP_BYTES = 4 << 30  # a row group of lmms-lab's copies holds a few hundred MB of images


def check_row_group_size(parquet, group: int, path) -> None:
    """A DataError before a row group is decompressed if its declared size is beyond any real
    dataset's: a few KB of parquet can ask for gigabytes."""
    size = parquet.metadata.row_group(group).total_byte_size
    if size > MAX_ROW_GROUP_BYTES:
        raise DataError(f"{path}: row group {group} decompresses to {size >> 20} MiB, more than this reader takes")


class EmbeddedImages:
    """Images kept inside the data: parquet rows (read a row group at a time and kept while the
    questions stay in it) and base64 text (MMBench's TSV)."""

    def __init__(self):
        self.key, self.column = None, None

    def read(self, question: Question) -> bytes:
        if isinstance(question.blob, str):
            try:
                return base64.b64decode(question.blob, validate=True)
            except (binascii.Error, ValueError):
                raise DataError(f"{question.source}: the image is not valid base64") from None
        import pyarrow.parquet as pq

        path, group, row = question.blob
        if self.key != (path, group):
            parquet = pq.ParquetFile(path)
            check_row_group_size(parquet, group, path)
            self.key = (path, group)
            self.column = parquet.read_row_group(group, columns=["image"]).column("image")
        image = self.column[row].as_py()
        data = image.get("bytes") if isinstance(image, dict) else image
        if not isinstance(data, bytes) or not data:
            raise DataError(f"{question.source}: the image column holds no image bytes")
        return data


# ---------------------------------------------------------------------------------------------
# The benchmarks
# ---------------------------------------------------------------------------------------------


class Benchmark:
    """What every benchmark says. `column` is its Table 1 header; `max_new_tokens` LLaVA's setting
    for its script (model_vqa_loader: 128; science and mmbench: 1024)."""

    name = ""
    column = ""
    max_new_tokens = 128
    folder = ""  # its folder under LLaVA's playground/data/eval/
    splits = ()  # for benchmarks with a test split (server-scored) and a val split (scored here)
    complete_only = False  # whether its metric is defined on complete data only (no partial score)

    def load(self, data: Path | None, images: Path | None, split: str | None) -> list[Question]:
        raise NotImplementedError

    def parse(self, answer: str, question: Question, parser: str):
        """The prediction the scorer compares with the label."""
        return answer

    def metrics(self, records: list[dict]) -> dict:
        """Scores of answered questions (their Question fields with `answer` and `pred`)."""
        raise NotImplementedError

    def submission(self, records: list[dict], data: Path | None, split: str | None) -> dict[str, object]:
        """Files a server scores, by name (records in question order; `data` the benchmark's
        folder): {} where this project scores the benchmark itself."""
        return {}

    def default_split(self, data: Path | None) -> str | None:
        return None

    def llava_answer(self, record: dict) -> dict:
        """The fields LLaVA's model_vqa_loader writes for an answered question: its id as the
        question file has it, the question text as asked (`prompt`) and the answer (`text`)."""
        return {"question_id": record["source_id"], "prompt": record["question"], "text": record["answer"]}

    def describe_prompt(self) -> str:
        """What decides the prompt, for the output folder's fingerprint."""
        return f"{self.name}: LLaVA evaluation prompts, suffixes as in its question files"


def yes_no_label(value, where: str) -> str:
    label = str(value).strip().lower()
    if label not in ("yes", "no"):
        raise DataError(f"{where}: the answer must be yes or no, got {value!r}")
    return label


class POPE(Benchmark):
    """POPE (LLaVA pope.sh): 8,910 yes/no questions on COCO val2014 in three categories; mean F1."""

    name, column, folder = "pope", "POPE", "pope"
    complete_only = True  # eval_pope.py pairs answers with labels by position, per category: all or nothing
    categories = ("adversarial", "popular", "random")
    hub = ("lmms-lab/POPE", "data/*.parquet")

    def load(self, data, images, split):
        if data is None:
            return self.load_hub()
        root = subfolder(data, self.folder)
        images = images or root / "val2014"  # checked when answering: scoring reads no image
        labels_dir = first_existing(root / "coco") or root
        questions_file = root / "llava_pope_test.jsonl"
        if questions_file.is_file():
            return self.load_llava(questions_file, labels_dir, images)
        return self.load_original(labels_dir, images)

    def label_files(self, folder: Path) -> dict[str, Path]:
        files = {c: folder / f"coco_pope_{c}.json" for c in self.categories}
        missing = [p.name for p in files.values() if not p.is_file()]
        if len(missing) == len(files):
            raise DataError(
                f"{folder} has none of coco_pope_adversarial.json, coco_pope_popular.json, coco_pope_random.json "
                "(POPE's output/coco folder, which LLaVA's layout keeps in pope/coco/)"
            )
        if missing:  # POPE's number is the mean F1 over all three: two would be another number
            raise DataError(f"{folder} lacks {' and '.join(missing)}: POPE's score is the mean over its 3 categories")
        return files

    def load_llava(self, questions_file: Path, labels_dir: Path, images: Path) -> list[Question]:
        """LLaVA's llava_pope_test.jsonl (its prompts), labelled as eval_pope.py does: within a
        category, the n-th question takes the n-th line of coco_pope_<category>.json."""
        labels = {c: [(f"{p}:{n}", r) for n, r in json_lines(p)] for c, p in self.label_files(labels_dir).items()}
        questions, taken = [], dict.fromkeys(labels, 0)
        for number, record in json_lines(questions_file):
            where = f"{questions_file}:{number}"
            fields = require(record, ("question_id", "image", "text", "category"), where)
            category = str(fields["category"])
            if category not in labels:
                raise DataError(f"{where}: category {category!r} has no coco_pope_{category}.json in {labels_dir}")
            if taken[category] >= len(labels[category]):
                raise DataError(f"{where}: more {category} questions than lines in coco_pope_{category}.json")
            label_where, label = labels[category][taken[category]]
            taken[category] += 1
            questions.append(
                Question(
                    str(fields["question_id"]),
                    category,
                    str(fields["text"]),
                    in_folder(images, str(fields["image"]), where, confined=True),
                    where,
                    label=yes_no_label(label.get("label"), label_where),
                    source_id=fields["question_id"],
                )
            )
        short = [c for c, n in taken.items() if n and n != len(labels[c])]
        if short:
            raise DataError(
                f"{questions_file}: its {short[0]} questions and coco_pope_{short[0]}.json differ in length"
            )
        return questions

    def load_original(self, folder: Path, images: Path) -> list[Question]:
        """POPE's own files: coco_pope_<category>.json, JSON lines numbering their questions from 1."""
        questions = []
        for category, path in self.label_files(folder).items():
            for number, record in json_lines(path):
                where = f"{path}:{number}"
                fields = require(record, ("question_id", "image", "text", "label"), where)
                questions.append(
                    Question(
                        str(fields["question_id"]),
                        category,
                        str(fields["text"]).strip() + SHORT_ANSWER,
                        in_folder(images, str(fields["image"]), where, confined=True),
                        where,
                        label=yes_no_label(fields["label"], where),
                        source_id=fields["question_id"],
                    )
                )
        return questions

    def load_hub(self) -> list[Question]:
        repo, pattern = self.hub
        questions = []
        for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern):
            require(r, ("question_id", "question", "answer", "category"), where)
            image = str(r.get("image_source") or f"row{row}")
            questions.append(
                Question(
                    str(r["question_id"]),
                    str(r["category"]),
                    str(r["question"]).strip() + SHORT_ANSWER,
                    image if image.lower().endswith((".jpg", ".png")) else image + ".jpg",
                    where,
                    label=yes_no_label(r["answer"], where),
                    source_id=r["question_id"],
                    blob=(path, group, row),
                )
            )
        return questions

    def parse(self, answer, question, parser):
        return scoring.parse_exact_yes_no(answer) if parser == "lmms-eval" else scoring.parse_pope_llava(answer)

    def metrics(self, records):
        return scoring.pope_metrics(records)


# MME's instruction, as LLaVA's llava_mme.jsonl removes it: after one space, or two in 7 questions.
MME_INSTRUCTION = re.compile(r"\s*Please answer yes or no\.")


class MME(Benchmark):
    """MME (LLaVA mme.sh): 2,374 yes/no questions, two per image, in 14 subtasks; perception score."""

    name, column, folder = "mme", "MME", "MME"
    hub = ("lmms-lab/MME", "data/*.parquet")

    def load(self, data, images, split):
        if data is None:
            return self.load_hub()
        root = subfolder(data, self.folder)
        release = first_existing(root / "MME_Benchmark_release_version") or root
        subtasks = [s for s in (*scoring.MME_PERCEPTION, *scoring.MME_COGNITION) if (release / s).is_dir()]
        if not subtasks:
            raise DataError(
                f"{release} holds none of MME's 14 subtask folders (existence, count, ..., code_reasoning): "
                "extract MME_Benchmark_release_version into it"
            )
        questions = []
        for subtask in subtasks:
            folder = release / subtask
            separate = (folder / "questions_answers_YN").is_dir()  # artwork, celebrity, landmark, posters, scene
            image_dir = folder / "images" if separate else folder
            if not image_dir.is_dir():
                raise DataError(f"{image_dir} is missing: {subtask}'s images go there (MME's release layout)")
            by_stem = {}
            for f in sorted(image_dir.iterdir()):
                if f.suffix.lower() in (".jpg", ".jpeg", ".png") and f.is_file():
                    by_stem.setdefault(f.stem, f)  # the suffix's case as it is on disk
            for text in sorted((folder / "questions_answers_YN" if separate else folder).glob("*.txt")):
                image = by_stem.get(text.stem, image_dir / (text.stem + ".jpg"))
                for number, raw in enumerate(lines(text), start=1):
                    if not raw.strip():
                        continue
                    parts = raw.split("\t")
                    where = f"{text}:{number}"
                    if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                        raise DataError(f"{where}: expected 'question<TAB>Yes|No', got {raw.strip()!r}")
                    questions.append(self.question(subtask, image, parts[0], parts[1], where, release))
        return questions

    def question(self, subtask, image: Path, question: str, label: str, where: str, release: Path) -> Question:
        """LLaVA's llava_mme.jsonl prompt: MME's " Please answer yes or no." replaced by the short-answer
        suffix; its question_id is the image's path in the release (two questions share it)."""
        source_id = image.relative_to(release).as_posix() if release else f"{subtask}/{image.name}"
        text = MME_INSTRUCTION.sub("", question).strip() + SHORT_ANSWER
        return Question(
            "",  # numbered by `number_pairs`
            subtask,
            text,
            str(image),
            where,
            label=yes_no_label(label, where),
            source_id=source_id,
            group=f"{subtask}/{image.name}",
        )

    def load_hub(self) -> list[Question]:
        repo, pattern = self.hub
        questions = []
        for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern):
            require(r, ("question_id", "question", "answer", "category"), where)
            image = str(r["question_id"]).split("/")[-1]
            q = self.question(str(r["category"]), Path(image), str(r["question"]), str(r["answer"]), where, None)
            q.image, q.source_id, q.blob = f"{r['category']}/{image}", r["question_id"], (path, group, row)
            questions.append(q)
        return questions

    def parse(self, answer, question, parser):
        return scoring.parse_mme_lmms_eval(answer) if parser == "lmms-eval" else scoring.parse_mme(answer)

    def metrics(self, records):
        return scoring.mme_metrics(records)


def number_pairs(questions: list[Question]) -> None:
    """MME's questions come two per image: <subtask>/<image>/1 and /2, in file order."""
    seen = {}
    for q in questions:
        if not q.question_id:
            seen[q.group] = seen.get(q.group, 0) + 1
            q.question_id = f"{q.group}/{seen[q.group]}"


def option_lines(choices: list[str]) -> str:
    return "".join(f"\n{letter}. {choice}" for letter, choice in zip(scoring.LETTERS, choices, strict=False))


class ScienceQA(Benchmark):
    """ScienceQA test (LLaVA sqa.sh, model_vqa_science): 4,241 multiple-choice questions, 2,017 with
    an image; the text-only ones are asked without one. The column is IMG accuracy."""

    name, column, folder = "sqa", "ScienceQA", "scienceqa"
    max_new_tokens = 1024
    hub = ("lmms-lab/ScienceQA", "ScienceQA-IMG/test-*.parquet")

    def load(self, data, images, split):
        if data is None:
            return self.load_hub()
        root = subfolder(data, self.folder)
        path = root / "llava_test_CQM-A.json"
        if not path.is_file():
            raise DataError(f"{root} has no llava_test_CQM-A.json: extract LLaVA's eval.zip (scienceqa/) there")
        images = images or root / "images" / "test"
        problems_file = root / "problems.json"
        problems = read_json(problems_file) if problems_file.is_file() else {}
        if not isinstance(problems, dict):
            raise DataError(f"{problems_file}: expected ScienceQA's JSON object of problems by id")
        items = read_json(path)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected a JSON list of questions")
        questions = []
        for number, item in enumerate(items):
            where = f"{path} (item {number})"
            if (
                not isinstance(item, dict)
                or not isinstance(item.get("conversations"), list)
                or not item["conversations"]
            ):
                raise DataError(f"{where}: expected an object with id and conversations")
            require(item, ("id",), where)
            turns = item["conversations"]
            value = str(turns[0].get("value", "")) if isinstance(turns[0], dict) else ""
            text = value.replace("<image>", "").strip()
            problem = problems.get(str(item["id"]))
            if isinstance(problem, dict) and isinstance(problem.get("choices"), list):
                choices, answer = [str(c) for c in problem["choices"]], problem.get("answer")
                label = scoring.LETTERS[answer] if isinstance(answer, int) and 0 <= answer < 5 else None
            else:  # without problems.json: the letter LLaVA's file gives, the options its text lists
                choices = [line[3:] for line in text.split("\n") if line[:1] in scoring.LETTERS and line[1:3] == ". "]
                label = (
                    str(turns[1].get("value", "")).strip() if len(turns) > 1 and isinstance(turns[1], dict) else None
                )
            if label not in scoring.LETTERS[: max(1, len(choices))]:
                raise DataError(f"{where}: no answer letter among its {len(choices)} options")
            image = in_folder(images, str(item["image"]), where, confined=True) if item.get("image") else None
            questions.append(
                Question(
                    str(item["id"]),
                    "default",
                    text + LETTER_ANSWER,
                    image,
                    where,
                    label=label,
                    choices=choices,
                    source_id=str(item["id"]),
                )
            )
        return questions

    def load_hub(self) -> list[Question]:
        """lmms-lab/ScienceQA's ScienceQA-IMG test split, in LLaVA's question format."""
        repo, pattern = self.hub
        questions = []
        for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern):
            require(r, ("question", "choices"), where)
            choices, answer = [str(c) for c in r["choices"]], r.get("answer")
            if not isinstance(answer, int) or not 0 <= answer < len(choices):
                raise DataError(f"{where}: answer must be an option index, got {answer!r}")
            context = f"Context: {r['hint']}\n" if r.get("hint") else ""
            text = context + str(r["question"]) + option_lines(choices) + LETTER_ANSWER
            questions.append(
                Question(
                    f"{Path(path).stem}/{group}/{row}",
                    "default",
                    text,
                    f"{Path(path).stem}/{group}/{row}.png",
                    where,
                    label=scoring.LETTERS[answer],
                    choices=choices,
                    blob=(path, group, row),
                )
            )
        return questions

    def llava_answer(self, record):
        """model_vqa_science's: the prompt marks an image question with "<image>\\n", which
        eval_science_qa.py reads to count the IMG subset."""
        line = super().llava_answer(record)
        return {**line, "prompt": "<image>\n" + line["prompt"]} if record["image"] is not None else line

    def parse(self, answer, question, parser):
        return scoring.parse_science_qa(answer)

    def metrics(self, records):
        return scoring.science_qa_metrics(records)


class GQA(Benchmark):
    """GQA testdev-balanced (LLaVA gqa.sh): 12,578 questions on 398 images; exact-match accuracy."""

    name, column, folder = "gqa", "GQA", "gqa"
    hub = (
        "lmms-lab/GQA",
        "testdev_balanced_instructions/testdev-*.parquet",
        "testdev_balanced_images/testdev-*.parquet",
    )

    def load(self, data, images, split):
        if data is None:
            return self.load_hub()
        root = subfolder(data, self.folder)
        path = root / "llava_gqa_testdev_balanced.jsonl"
        answers_file = first_existing(
            root / "data" / "testdev_balanced_questions.json", root / "testdev_balanced_questions.json"
        )
        if not path.is_file() or answers_file is None:
            raise DataError(
                f"{root} needs llava_gqa_testdev_balanced.jsonl (LLaVA's eval.zip) and "
                "data/testdev_balanced_questions.json (GQA's questions, with the answers)"
            )
        images = images or first_existing(root / "data" / "images", root / "images") or root / "data" / "images"
        truth = read_json(answers_file)
        if not isinstance(truth, dict):
            raise DataError(f"{answers_file}: expected GQA's object of questions by id")
        questions = []
        for number, record in json_lines(path):
            where = f"{path}:{number}"
            fields = require(record, ("question_id", "image", "text"), where)
            known = truth.get(str(fields["question_id"]))
            if not isinstance(known, dict) or "answer" not in known:
                raise DataError(f"{where}: question {fields['question_id']} has no answer in {answers_file}")
            types = known.get("types") if isinstance(known.get("types"), dict) else {}
            questions.append(
                Question(
                    str(fields["question_id"]),
                    "default",
                    str(fields["text"]),
                    in_folder(images, str(fields["image"]), where, confined=True),
                    where,
                    label=str(known["answer"]),
                    source_id=fields["question_id"],
                    extra={"structural": types.get("structural")},
                )
            )
        return questions

    def load_hub(self) -> list[Question]:
        repo, pattern, image_pattern = self.hub
        folder = download(repo, [pattern, image_pattern])
        blobs = {
            str(r["id"]): (path, group, row)
            for _, path, group, row, r in parquet_rows(repo, folder, image_pattern, ["id"])
        }
        questions = []
        for where, _, _, _, r in parquet_rows(repo, folder, pattern, images=False):
            require(r, ("id", "imageId", "question", "answer"), where)
            if str(r["imageId"]) not in blobs:
                raise DataError(f"{where}: image {r['imageId']} is not in {repo}'s testdev_balanced_images")
            types = r.get("types") if isinstance(r.get("types"), dict) else {}
            questions.append(
                Question(
                    str(r["id"]),
                    "default",
                    str(r["question"]) + SHORT_ANSWER,
                    f"{r['imageId']}.jpg",
                    where,
                    label=str(r["answer"]),
                    source_id=str(r["id"]),
                    blob=blobs[str(r["imageId"])],
                    extra={"structural": types.get("structural")},
                )
            )
        return questions

    def parse(self, answer, question, parser):
        return scoring.gqa_prediction(answer)

    def metrics(self, records):
        return scoring.gqa_metrics(records)


# pandas.read_table's default missing-value strings: LLaVA's model_vqa_mmbench reads the TSV with
# pandas, so a hint or an option spelled like one of these counts as absent.
MISSING = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A"}
MISSING |= {"NA", "NULL", "NaN", "None", "n/a", "nan", "null"}


def absent(value) -> bool:
    """LLaVA's is_none on a value read as pandas reads it."""
    if value is None or isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and (value in MISSING or value.lower() in ("nan", "none"))


class MMBench(Benchmark):
    """MMBench dev (LLaVA mmbench.sh, model_vqa_mmbench --single-pred-prompt): 4,377 rows that are
    1,176 questions with their options rotated; scored by VLMEvalKit's circular rule, no GPT judge."""

    name, column, folder = "mmbench", "MMBench", "mmbench"
    max_new_tokens = 1024
    tsv = "mmbench_dev_20230712.tsv"
    suffix = LETTER_ANSWER
    hub = ("lmms-lab/MMBench", "en/dev-*.parquet")

    def load(self, data, images, split):
        if data is None:
            return self.load_hub()
        path = (
            data
            if data.is_file()
            else first_existing(subfolder(data, self.folder) / self.tsv, data / "mmbench" / self.tsv)
        )
        if path is None:
            raise DataError(f"{data} has no {self.tsv}: download it into {data / self.folder}/ (see the README)")
        rows = tsv_rows(path)
        header = rows[0][1] if rows else []
        missing = {"index", "question", "A", "B", "answer", "image"} - set(header)
        if missing:
            raise DataError(f"{path}: not MMBench's TSV (no column(s) {', '.join(sorted(missing))})")
        questions = []
        for number, cells in rows[1:]:
            where = f"{path}:{number}"
            if len(cells) != len(header):
                raise DataError(f"{where}: {len(cells)} tab-separated cells where the header has {len(header)}")
            questions.append(self.question(dict(zip(header, cells, strict=True)), where, blob=None))
        return questions

    def question(self, row: dict, where: str, blob) -> Question:
        """LLaVA's model_vqa_mmbench prompt: the hint (when present) and the question, then the
        options up to the first absent one as "A. ...", then the single-letter instruction."""
        options = []
        for letter in "ABCD":
            if absent(row.get(letter)):
                break
            options.append(str(row[letter]))
        question = str(row["question"]) if absent(row.get("hint")) else f"{row['hint']}\n{row['question']}"
        try:
            index = int(row["index"])
        except (TypeError, ValueError):
            raise DataError(f"{where}: index must be a whole number, got {row.get('index')!r}") from None
        label = str(row.get("answer", "")).strip()
        if label not in scoring.LETTERS[: len(options)]:
            raise DataError(f"{where}: answer {label!r} is not one of its {len(options)} option letters")
        return Question(
            str(index),
            str(row.get("category") or "default"),
            question + option_lines(options) + self.suffix,
            f"{self.name}/{index % 1_000_000}",  # the rotated copies of a question share its image
            where,
            label=label,
            choices=options,
            source_id=index,
            group=str(index % 1_000_000),
            blob=blob if blob is not None else str(row["image"]),
            extra={"index": index},
        )

    def load_hub(self) -> list[Question]:
        repo, pattern = self.hub
        return [
            self.question(r, where, (path, group, row))
            for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern)
        ]

    def llava_answer(self, record):
        """model_vqa_mmbench's: the prompt without the instruction, the options and their letters."""
        options = record["choices"]
        return {
            "question_id": record["source_id"],
            "round_id": 0,
            "prompt": record["question"].removesuffix(self.suffix),
            "text": record["answer"],
            "options": options,
            "option_char": list("ABCD"[: len(options)]),
        }

    def parse(self, answer, question, parser):
        return scoring.parse_mmbench(answer, dict(zip(scoring.LETTERS, question.choices, strict=False)))

    def metrics(self, records):
        return scoring.mmbench_metrics(records)


class MMBenchCN(MMBench):
    """MMBench-CN dev (LLaVA mmbench_cn.sh, --lang cn): the same rows in Chinese, a Chinese instruction."""

    name, column, folder = "mmbench_cn", "MMBench-CN", "mmbench_cn"
    tsv = "mmbench_dev_cn_20231003.tsv"
    suffix = LETTER_ANSWER_CN
    hub = ("lmms-lab/MMBench", "cn/dev-*.parquet")


class VQA(Benchmark):
    """A VQA-style benchmark: the test split, on which LLaVA's script writes the EvalAI upload, or
    the val split, scored here by the VQA soft accuracy over its human answers."""

    splits = ("test", "val")
    test_file = ""  # LLaVA's question file of the test split
    test_images = ""  # the folder its images go in, in LLaVA's layout

    def default_split(self, data: Path | None) -> str:
        return "test" if data is not None and (subfolder(data, self.folder) / self.test_file).is_file() else "val"

    def load(self, data, images, split):
        split = split or self.default_split(data)
        if data is None:
            return self.load_hub(split)
        root = subfolder(data, self.folder)
        return self.load_test(root, images) if split == "test" else self.load_val(root, images)

    def load_test(self, root: Path, images: Path | None) -> list[Question]:
        """LLaVA's question file for the server-scored split (model_vqa_loader's input): no answers."""
        path = root / self.test_file
        if not path.is_file():
            raise DataError(f"{root} has no {self.test_file}: extract LLaVA's eval.zip ({self.folder}/) there")
        images = images or root / self.test_images
        questions = []
        for n, r in json_lines(path):
            where = f"{path}:{n}"
            require(r, ("question_id", "image", "text"), where)
            image = in_folder(images, str(r["image"]), where, confined=True)
            extra = {"image_name": str(r["image"])}  # VizWiz's upload names the image
            questions.append(
                Question(
                    str(r["question_id"]),
                    "default",
                    str(r["text"]),
                    image,
                    where,
                    source_id=r["question_id"],
                    extra=extra,
                )
            )
        return questions

    def parse(self, answer, question, parser):
        return scoring.evalai_answer(answer)

    def metrics(self, records):
        return scoring.vqa_metrics(records)


class VizWiz(VQA):
    """VizWiz (LLaVA vizwiz.sh): 8,000 test questions scored by EvalAI, or the val split here."""

    name, column, folder = "vizwiz", "VizWiz", "vizwiz"
    test_file, test_images = "llava_test.jsonl", "test"
    hub = ("lmms-lab/VizWiz-VQA", "data/val-*.parquet")

    def load_val(self, root: Path, images: Path | None) -> list[Question]:
        """VizWiz's val annotations (val.json, 10 answers a question) and images (val/)."""
        path = root / "val.json"
        if not path.is_file():
            raise DataError(f"{root} has no val.json: VizWiz's val annotations (Annotations.zip) go there")
        images = images or root / "val"
        items = read_json(path)
        if not isinstance(items, list):
            raise DataError(f"{path}: expected VizWiz's JSON list of questions")
        questions = []
        for n, item in enumerate(items):
            where = f"{path} (item {n})"
            require(item if isinstance(item, dict) else {}, ("image", "question", "answers"), where)
            answers = [a.get("answer", "") if isinstance(a, dict) else str(a) for a in answer_list(item, where)]
            questions.append(self.val_question(str(item["image"]), item["question"], answers, where, images))
        return questions

    def val_question(self, image: str, question: str, answers: list[str], where: str, images: Path | None) -> Question:
        """LLaVA's VizWiz prompt (its llava_test.jsonl): the question, the Unanswerable line, the suffix."""
        path = in_folder(images, image, where, confined=True) if images is not None else image
        return Question(
            image, "default", f"{question}{UNANSWERABLE}{SHORT_ANSWER}", path, where, answers=answers, source_id=image
        )

    def load_hub(self, split: str) -> list[Question]:
        if split != "val":
            raise DataError("VizWiz's test split has no answers on the Hub: use LLaVA's vizwiz/ folder", "--data DIR")
        repo, pattern = self.hub
        questions = []
        for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern):
            require(r, ("question", "answers"), where)
            name = str(r.get("question_id") or r.get("image_id") or f"{group}-{row}")
            q = self.val_question(name, str(r["question"]), [str(a) for a in answer_list(r, where)], where, None)
            q.blob = (path, group, row)
            questions.append(q)
        return questions

    def submission(self, records, data, split):
        """LLaVA's convert_vizwiz_for_submission.py: every test question in file order, the answer
        normalised by EvalAI's processor (the EvalAI VizWiz challenge's upload)."""
        if split != "test":
            return {}
        rows = [{"image": r["image_name"], "answer": scoring.evalai_answer(r["answer"])} for r in records]
        return {"vizwiz_test_submission.json": rows}


class VQAv2(VQA):
    """VQAv2 (LLaVA vqav2.sh): test-dev, 107,394 questions scored by EvalAI, or the val split here."""

    name, column, folder = "vqav2", "VQAv2", "vqav2"
    test_file, test_images = "llava_vqav2_mscoco_test-dev2015.jsonl", "test2015"
    hub = ("lmms-lab/VQAv2", "data/validation-*.parquet")

    def load_val(self, root: Path, images: Path | None) -> list[Question]:
        """The VQA API's val2014 questions and annotations (10 answers a question), images in val2014/."""
        questions_file = root / "v2_OpenEnded_mscoco_val2014_questions.json"
        annotations_file = root / "v2_mscoco_val2014_annotations.json"
        if not questions_file.is_file() or not annotations_file.is_file():
            raise DataError(
                f"{root} needs VQAv2's v2_OpenEnded_mscoco_val2014_questions.json and "
                "v2_mscoco_val2014_annotations.json for the val split"
            )
        images = images or root / "val2014"
        asked, annotated = read_json(questions_file), read_json(annotations_file)
        try:
            answers = {a["question_id"]: [x["answer"] for x in a["answers"]] for a in annotated["annotations"]}
            items = [(q["question_id"], q["image_id"], q["question"]) for q in asked["questions"]]
        except (KeyError, TypeError):
            raise DataError(f"{questions_file} or {annotations_file} is not in VQAv2's format") from None
        questions = []
        for n, (qid, image_id, question) in enumerate(items):
            where = f"{questions_file} (question {n})"
            if not is_whole_number(image_id):
                raise DataError(f"{where}: image_id must be a whole number, got {image_id!r}")
            image = in_folder(images, f"COCO_val2014_{int(image_id):012d}.jpg", where, confined=True)
            q = Question(str(qid), "default", f"{question}{SHORT_ANSWER}", image, where, source_id=qid)
            q.answers = [str(a) for a in answers.get(qid, [])]
            questions.append(q)
        return questions

    def load_hub(self, split: str) -> list[Question]:
        if split != "val":
            raise DataError("VQAv2's test-dev split has no answers on the Hub: use LLaVA's vqav2/ folder", "--data DIR")
        repo, pattern = self.hub
        questions = []
        for where, path, group, row, r in parquet_rows(repo, download(repo, [pattern]), pattern):
            require(r, ("question_id", "question", "answers"), where)
            answers = [str(a.get("answer", "")) if isinstance(a, dict) else str(a) for a in answer_list(r, where)]
            image_id = r.get("image_id") or 0
            if not is_whole_number(image_id):
                raise DataError(f"{where}: image_id must be a whole number, got {image_id!r}")
            image = f"COCO_val2014_{int(image_id):012d}.jpg"
            questions.append(
                Question(
                    str(r["question_id"]),
                    "default",
                    f"{r['question']}{SHORT_ANSWER}",
                    image,
                    where,
                    answers=answers,
                    source_id=r["question_id"],
                    blob=(path, group, row),
                )
            )
        return questions

    def submission(self, records, data, split):
        """LLaVA's convert_vqav2_for_submission.py: one row per question of the whole test2015 file
        (llava_vqav2_mscoco_test2015.jsonl, when it is there), "" for those not run."""
        if split != "test":
            return {}
        answered = {str(r["source_id"]): scoring.evalai_answer(r["answer"]) for r in records}
        everything = subfolder(data, self.folder) / "llava_vqav2_mscoco_test2015.jsonl" if data else None
        ids = [r.get("question_id") for _, r in json_lines(everything)] if everything and everything.is_file() else None
        if ids is None:
            ids = [r["source_id"] for r in records]
        return {"vqav2_test-dev_submission.json": [{"question_id": i, "answer": answered.get(str(i), "")} for i in ids]}


class JSONLines(Benchmark):
    """Any set of questions as JSON Lines: {"question_id", "image", "question", "answer"} and,
    optionally, "category". Images are relative to --images, or to the file's own folder."""

    name, column = "jsonl", "accuracy"

    def load(self, data, images, split):
        if data is None or not data.is_file():
            raise DataError(f"{data} must be a .jsonl file of questions", "--data FILE")
        questions = []
        for number, r in json_lines(data):
            where = f"{data}:{number}"
            require(r, ("question_id", "image", "question", "answer"), where)
            questions.append(
                Question(
                    str(r["question_id"]),
                    str(r.get("category", "all")),
                    str(r["question"]).strip() + SHORT_ANSWER,
                    in_folder(images or data.parent, str(r["image"]), where, confined=images is not None),
                    where,
                    label=str(r["answer"]),
                    source_id=r["question_id"],
                )
            )
        return questions

    def parse(self, answer, question, parser):
        if question.label.strip().lower() in ("yes", "no"):
            return scoring.parse_exact_yes_no(answer) if parser == "lmms-eval" else scoring.parse_pope_llava(answer)
        return scoring.normalize(answer)

    def metrics(self, records):
        return scoring.exact_match_metrics(records)


BENCHMARKS = {b.name: b for b in (MME(), ScienceQA(), GQA(), POPE(), MMBench(), MMBenchCN(), VizWiz(), VQAv2())}
BENCHMARKS["jsonl"] = JSONLines()
# The paper's tables, by name: Table 1's eight columns in its order, and Table 4's four.
TABLES = {
    "table1": ["mme", "sqa", "gqa", "pope", "mmbench", "mmbench_cn", "vizwiz", "vqav2"],
    "table4": ["mme", "sqa", "gqa", "pope"],
}


def load_questions(benchmark: Benchmark, data: Path | None, images: Path | None, split: str | None) -> list[Question]:
    """A benchmark's questions, each (category, question_id) once: a repeat would silently merge
    two questions' answers, so it is refused naming both places."""
    questions = benchmark.load(data, images, split)
    number_pairs(questions)
    seen = {}
    for q in questions:
        if q.key in seen:
            raise DataError(
                f"{q.source}: question {q.question_id!r} ({q.category}) is already at {seen[q.key]}: "
                "question ids must be unique within a category"
            )
        seen[q.key] = q.source
    if not questions:
        raise DataError(f"{data or benchmark.name} holds no questions")
    return questions


def limit(questions: list[Question], n: int) -> list[Question]:
    """The first n questions of every category (MMBench: n questions with all their rotated
    copies; MME: n images with both their questions), in the benchmark's order."""
    kept, groups = [], {}
    for q in questions:
        chosen = groups.setdefault(q.category, set())
        group = q.group or q.question_id
        if group not in chosen and len(chosen) < n:
            chosen.add(group)
        if group in chosen:
            kept.append(q)
    return kept
