"""Reproduce the paper's accuracy and efficiency rows (Tables 1 and 3) on POPE, MME, or any yes/no or
short-answer set, for several pruning configurations in one run.

    python evaluate.py --benchmark pope --data POPE/output/coco --images val2014 --configs full,todre-0.10
    python evaluate.py --benchmark mme --data MME_Benchmark_release_version
    python evaluate.py --benchmark jsonl --data questions.jsonl --images DIR
    python evaluate.py --benchmark pope              # no --data: lmms-lab/POPE from the Hub (needs pyarrow)
    torchrun --nproc-per-node 8 evaluate.py ...      # the questions sharded over 8 GPUs

Every sample is encoded by the vision tower once and then answered under every configuration.
Predictions are appended to DIR/<config>/predictions.jsonl one line at a time, so an interrupted
run loses at most the sample in flight, and rerunning the same command continues where it stopped
and recomputes the scores into DIR/results.json. Progress goes to stderr, the final table to stdout.
"""

import signal

# Ctrl-C while torch imports: end quietly, as generate.py does (exit 130).
CTRL_C_HANDLED = __name__ == "__main__" and signal.getsignal(signal.SIGINT) is signal.default_int_handler
if CTRL_C_HANDLED:
    signal.signal(signal.SIGINT, signal.SIG_DFL)

import argparse
import json
import math
import os
import sys
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

import media
import model as llava
import todre
from checkpoint import os_error_text
from generate import Parser, UsageError, add_device_flags, check_not_empty, check_number, pick_device, pick_dtype
from media import MediaError, open_image, open_image_bytes

# LLaVA's and lmms-eval's instruction for short answers, appended to every question.
SUFFIX = "\nAnswer the question using a single word or phrase."
POPE_CATEGORIES = ("random", "popular", "adversarial")
MME_PERCEPTION = (
    "existence",
    "count",
    "position",
    "color",
    "posters",
    "celebrity",
    "scene",
    "landmark",
    "artwork",
    "OCR",
)
MME_COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
MME_SEPARATE_FOLDERS = ("artwork", "celebrity", "landmark", "posters", "scene")  # images/ + questions_answers_YN/
IMAGE_SUFFIXES = tuple(sorted(media.IMAGE_SUFFIXES))  # for str.endswith


class DataError(Exception):
    """A benchmark file that cannot be used; the message names the file and the line."""


@dataclass
class Sample:
    """One question of a benchmark."""

    question_id: str
    image: str  # the image's path
    category: str  # POPE split, MME subtask, or a jsonl set's own category
    question: str
    label: str  # the expected answer
    source: str  # "file:line" the question came from, for error messages
    blob: tuple | None = None  # (parquet file, row group, row) of an embedded image; None: `image` is a path

    @property
    def key(self) -> tuple[str, str]:
        """Real POPE files each number their questions from 1: a question is (category, id)."""
        return self.category, self.question_id


# ---------------------------------------------------------------------------------------------
# Benchmarks on disk
# ---------------------------------------------------------------------------------------------


def load_pope(data: Path, images: Path | None) -> list[Sample]:
    """POPE's original layout: coco_pope_{random,popular,adversarial}.json, JSON Lines despite the
    name (question_id, image, text, label), with the COCO val2014 images in `images`."""
    if images is None:
        raise UsageError("--images DIR is needed for POPE: the COCO val2014 images its questions refer to")
    files = [(data / f"coco_pope_{c}.json", c) for c in POPE_CATEGORIES]
    if not any(path.is_file() for path, _ in files):
        raise DataError(f"{data} has none of coco_pope_random.json, coco_pope_popular.json, coco_pope_adversarial.json")
    samples = []
    for path, category in files:
        for line, record in json_lines(path):
            where = f"{path}:{line}"
            fields = require_fields(record, ("question_id", "image", "text", "label"), where)
            label = fields["label"].strip().lower() if isinstance(fields["label"], str) else None
            if label not in ("yes", "no"):
                raise DataError(f"{where}: label must be yes or no, got {fields['label']!r}")
            samples.append(
                Sample(
                    str(fields["question_id"]),
                    str(images / str(fields["image"])),
                    category,
                    str(fields["text"]),
                    label,
                    where,
                )
            )
    return samples


def load_mme(data: Path) -> list[Sample]:
    """MME's release layout: one folder per subtask; five keep images/ and questions_answers_YN/,
    nine keep each image beside its .txt; every .txt holds `question<TAB>Yes|No` lines (two per
    image). A question is <subtask>/<image file>/<line>."""
    subtasks = [name for name in (*MME_PERCEPTION, *MME_COGNITION) if (data / name).is_dir()]
    if not subtasks:
        raise DataError(f"{data} holds none of MME's 14 subtask folders (existence, count, ..., code_reasoning)")
    samples = []
    for subtask in subtasks:
        folder = data / subtask
        separate = (folder / "questions_answers_YN").is_dir()
        texts = sorted((folder / "questions_answers_YN" if separate else folder).glob("*.txt"))
        for text in texts:
            image_dir = folder / "images" if separate else folder
            image = next(
                (image_dir / (text.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (text.stem + s)).is_file()),
                image_dir / (text.stem + ".jpg"),
            )
            for line, raw in enumerate(read_lines(text), start=1):
                if not raw.strip():
                    continue
                parts = raw.rstrip("\r\n").split("\t")
                if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                    raise DataError(f"{text}:{line}: expected 'question<TAB>Yes|No', got {raw.strip()!r}")
                samples.append(
                    Sample(
                        f"{subtask}/{image.name}/{line}",
                        str(image),
                        subtask,
                        parts[0].strip(),
                        parts[1].strip().lower(),
                        f"{text}:{line}",
                    )
                )
    return samples


def load_jsonl(data: Path, images: Path | None) -> list[Sample]:
    """Any set as JSON Lines: {"question_id", "image", "question", "answer"} and, optionally,
    "category". Images are relative to --images, or to the file's own folder."""
    samples = []
    for line, record in json_lines(data):
        where = f"{data}:{line}"
        fields = require_fields(record, ("question_id", "image", "question", "answer"), where)
        samples.append(
            Sample(
                str(fields["question_id"]),
                str((images or data.parent) / str(fields["image"])),
                str(record.get("category", "all")),
                str(fields["question"]),
                str(fields["answer"]),
                where,
            )
        )
    return samples


# Benchmarks straight from the Hub: lmms-lab's parquet copies, with the images embedded.
HUB_DATASETS = {"pope": ("lmms-lab/POPE", "data/*.parquet"), "mme": ("lmms-lab/MME", "data/*.parquet")}


def download_hub(benchmark: str) -> list[Path]:
    """The benchmark's parquet files, downloaded (or found in the Hub cache) with huggingface-hub."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError

    repo, pattern = HUB_DATASETS[benchmark]
    try:
        folder = Path(snapshot_download(repo_id=repo, repo_type="dataset", allow_patterns=[pattern]))
    except RepositoryNotFoundError:
        raise DataError(f"{repo} is not on the Hugging Face Hub any more: pass --data DIR") from None
    except (LocalEntryNotFoundError, OSError) as e:
        raise DataError(
            f"cannot download {repo} from the Hugging Face Hub ({type(e).__name__}); "
            "if you are offline, pass a local copy with --data DIR"
        ) from None
    files = sorted(folder.glob(pattern))
    if not files:
        raise DataError(f"{repo} has no {pattern} files")
    return files


def load_parquet(files: list[Path], benchmark: str) -> list[Sample]:
    """lmms-lab's POPE and MME parquet files, read row group by row group and without their images
    (those are read one row group at a time while answering). Fields:
    POPE: question_id, question, answer (label), category, image_source (the COCO file name);
    MME: question_id (<subtask>/<image>, shared by an image's two questions, which become
    <subtask>/<image>/1 and /2 in their order, as the release layout's lines), question, answer,
    category."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"reading {HUB_DATASETS[benchmark][0]} needs pyarrow: pip install pyarrow "
            "(or pass the original layout with --data DIR)"
        ) from None
    samples, seen = [], Counter()
    for path in files:
        try:
            parquet = pq.ParquetFile(path)
            columns = [c for c in parquet.schema_arrow.names if c != "image"]
            for group in range(parquet.num_row_groups):
                for row, record in enumerate(parquet.read_row_group(group, columns=columns).to_pylist()):
                    where = f"{path} (row group {group}, row {row})"
                    fields = require_fields(record, ("question_id", "question", "answer", "category"), where)
                    label = str(fields["answer"]).strip().lower()
                    if label not in ("yes", "no"):
                        raise DataError(f"{where}: answer must be yes or no, got {fields['answer']!r}")
                    if benchmark == "mme":
                        image = str(fields["question_id"]).split("/")[-1]
                        seen[(fields["category"], image)] += 1
                        question_id = f"{fields['category']}/{image}/{seen[(fields['category'], image)]}"
                    else:
                        image, question_id = str(record.get("image_source") or ""), str(fields["question_id"])
                        image += "" if image.lower().endswith(IMAGE_SUFFIXES) or not image else ".jpg"
                    samples.append(
                        Sample(
                            question_id,
                            image,
                            str(fields["category"]),
                            str(fields["question"]),
                            label,
                            where,
                            (str(path), group, row),
                        )
                    )
        except (OSError, ValueError) as e:
            if isinstance(e, DataError):
                raise
            raise DataError(f"{path} is not a readable parquet file ({e})") from None
    return samples


class ParquetImages:
    """Embedded images, read one row group at a time (the questions come in file order)."""

    def __init__(self):
        self.key, self.images = None, None

    def open(self, sample: Sample):
        import pyarrow.parquet as pq

        path, group, row = sample.blob
        if self.key != (path, group):
            self.key, self.images = (path, group), pq.ParquetFile(path).read_row_group(group, columns=["image"])
        image = self.images.column("image")[row].as_py()
        data = image.get("bytes") if isinstance(image, dict) else image
        if not data:
            raise MediaError(f"{sample.source} has no image bytes")
        return open_image_bytes(data, sample.source)


def read_lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        reason = os_error_text(e) if isinstance(e, OSError) else f"not UTF-8 text ({e.reason})"
        raise DataError(f"cannot read {path}: {reason}") from None


def json_lines(path: Path):
    """(line number, JSON object) for every non-empty line of `path`; a bad line is a DataError."""
    if not path.is_file():
        return
    for line, raw in enumerate(read_lines(path), start=1):
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{line}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{path}:{line}: expected a JSON object, got {type(record).__name__}")
        yield line, record


def require_fields(record: dict, names, where: str) -> dict:
    missing = [name for name in names if record.get(name) in (None, "")]
    if missing:
        raise DataError(f"{where}: missing field(s) {', '.join(missing)}")
    return record


# ---------------------------------------------------------------------------------------------
# Scoring, exactly as the community scores these benchmarks
# ---------------------------------------------------------------------------------------------


def parse_pope_llava(answer: str) -> str:
    """LLaVA's eval_pope.py: the text before the first '.', commas removed, split on spaces; any of
    the words No, not, no makes it "no", anything else "yes"."""
    text = answer.split(".")[0] if "." in answer else answer
    words = text.replace(",", "").split(" ")
    return "no" if "No" in words or "not" in words or "no" in words else "yes"


def parse_exact_yes_no(answer: str) -> str:
    """lmms-eval's POPE: the answer lowered and stripped must be exactly yes or no, else "other"."""
    text = answer.lower().strip()
    return text if text in ("yes", "no") else "other"


def parse_mme(answer: str) -> str:
    """lmms-eval's MME (from Otter): lowered, stripped, '.' dropped; exactly yes/no, or y/n alone,
    else yes or no within the first 4 characters, else "other" (counted wrong)."""
    text = answer.lower().strip().replace(".", "")
    if text in ("yes", "no"):
        return text
    if len(text) == 1:
        return {"y": "yes", "n": "no"}.get(text, "other")
    return "yes" if "yes" in text[:4] else "no" if "no" in text[:4] else "other"


def normalize(answer: str) -> str:
    """For short answers: lowered, inner whitespace collapsed, surrounding punctuation stripped."""
    return " ".join(answer.lower().split()).strip(" .,;:!?\"'")


PARSERS = {"llava": parse_pope_llava, "lmms-eval": parse_exact_yes_no}


def yes_no_metrics(records: list[dict]) -> dict:
    """Accuracy, precision, recall and F1 of "yes", and the share of "yes" predictions, as
    fractions; a ratio whose denominator is 0 is 0. An unparseable prediction ("other") is wrong
    and counts in no cell of the confusion matrix (lmms-eval's reading)."""
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


def ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def by_category(records: list[dict]) -> dict[str, list[dict]]:
    groups = {}
    for record in records:
        groups.setdefault(record["category"], []).append(record)
    return groups


def pope_metrics(records: list[dict]) -> dict:
    """Per category accuracy, precision, recall, F1 and yes-ratio; mean_f1 over the categories."""
    metrics = {category: yes_no_metrics(group) for category, group in by_category(records).items()}
    metrics["mean_f1"] = ratio(sum(m["f1"] for m in metrics.values()), len(metrics))
    return metrics


def mme_metrics(records: list[dict]) -> dict:
    """Per subtask acc (questions right), acc+ (images with both questions right) and
    score = 100 * (acc + acc+); perception and cognition sum the scores of the subtasks present,
    and `missing` lists the subtasks with no question."""
    metrics = {}
    for subtask, group in sorted(by_category(records).items()):
        images = {}
        for r in group:
            images.setdefault(r["image"], []).append(r["pred"] == r["label"])
        acc, acc_plus = (
            ratio(sum(sum(v) for v in images.values()), len(group)),
            ratio(sum(all(v) for v in images.values()), len(images)),
        )
        metrics[subtask] = {"acc": acc, "acc_plus": acc_plus, "score": 100 * (acc + acc_plus)}
    metrics["perception"] = sum(metrics[s]["score"] for s in MME_PERCEPTION if s in metrics)
    metrics["cognition"] = sum(metrics[s]["score"] for s in MME_COGNITION if s in metrics)
    metrics["missing"] = [s for s in (*MME_PERCEPTION, *MME_COGNITION) if s not in metrics]
    return metrics


def jsonl_metrics(records: list[dict]) -> dict:
    """Yes/no sets are scored like POPE; any other set by normalised exact match, per category."""
    if all(r["label"].strip().lower() in ("yes", "no") for r in records):
        return pope_metrics(records)
    metrics = {
        category: {"accuracy": ratio(sum(r["pred"] == normalize(r["label"]) for r in group), len(group))}
        for category, group in sorted(by_category(records).items())
    }
    metrics["accuracy"] = ratio(sum(r["pred"] == normalize(r["label"]) for r in records), len(records))
    return metrics


def relative(metrics, full):
    """`metrics` divided by the full configuration's, field by field (the paper's "Average"
    column); None where the full value is 0 or missing."""
    if isinstance(metrics, dict):
        return {
            key: relative(value, full.get(key) if isinstance(full, dict) else None) for key, value in metrics.items()
        }
    if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        return metrics / full if isinstance(full, (int, float)) and full else None
    return None


# ---------------------------------------------------------------------------------------------
# Predictions on disk
# ---------------------------------------------------------------------------------------------


class Predictions:
    """DIR/<config>/: predictions.jsonl (one process) or predictions.rank<R>.jsonl (rank R under
    torchrun), one JSON line per answered question, appended and flushed at once. Together the
    files are what has been answered: a question is counted once, from the first file that has it,
    whatever number of processes wrote them. A last line cut off by a kill is skipped (and dropped
    from this process's own file)."""

    def __init__(self, folder: Path, rank: int = 0, world_size: int = 1):
        self.folder = folder
        self.path = folder / ("predictions.jsonl" if world_size == 1 else f"predictions.rank{rank}.jsonl")
        self.records = self.read_all()
        self.done = {(r["category"], r["question_id"]) for r in self.records}

    def files(self) -> list[Path]:
        ranks = sorted(self.folder.glob("predictions.rank*.jsonl"), key=lambda p: int(p.stem.rpartition("rank")[2]))
        single = self.folder / "predictions.jsonl"
        return ([single] if single.exists() else []) + ranks

    def read_all(self) -> list[dict]:
        records, seen = [], set()
        for path in self.files():
            for record in self.read(path, repair=path == self.path):
                key = (record["category"], record["question_id"])
                if key not in seen:
                    seen.add(key)
                    records.append(record)
        return records

    @staticmethod
    def read(path: Path, repair: bool) -> list[dict]:
        records, lines = [], path.read_text(encoding="utf-8").splitlines()
        for number, line in enumerate(lines, start=1):
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if number < len(lines):
                    raise DataError(f"{path}:{number}: not valid JSON; remove the file to redo its questions") from None
                if repair:  # a write cut off by a kill: this process is the file's only writer
                    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.done.add((record["category"], record["question_id"]))


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    p = Parser(
        description=__doc__.split("\n")[0],
        epilog=todre.CONFIG_NAMES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--benchmark", required=True, choices=["pope", "mme", "jsonl"])
    p.add_argument(
        "--data",
        help="POPE: the folder of coco_pope_*.json; MME: the release folder; jsonl: the "
        "questions file. Omitted: POPE and MME come from the Hub (lmms-lab/POPE, lmms-lab/MME)",
    )
    p.add_argument("--images", help="POPE: the COCO val2014 folder; jsonl: the folder images are relative to")
    p.add_argument("--model", default=llava.DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    p.add_argument("--configs", default="full,todre-0.25,todre-0.10", help="comma-separated configuration names")
    p.add_argument("--limit", type=int, help="only the first N questions (in file order)")
    p.add_argument("--out", help="output folder (default: eval-<benchmark>)")
    p.add_argument(
        "--parser",
        choices=list(PARSERS),
        default="llava",
        help="POPE answers: LLaVA's eval_pope.py reading (default) or lmms-eval's exact yes/no",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count in results.json) questions whose image is missing or damaged, "
        "instead of stopping with an error",
    )
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument(
        "--figure2",
        action="store_true",
        help="record eq. 7 at every decoder layer in the full configuration: DIR/figure2.json, and "
        "DIR/figure2.png with matplotlib (the paper's Figure 2: where Stage 2 will fire on this data)",
    )
    p.add_argument("--tau", type=float, help="Stage 2 threshold for the configurations that use Stage 2")
    p.add_argument("--newlines", choices=["drop", "keep"], help="Stage 1 and the image_newline tokens")
    p.add_argument("--pad-to-square", action="store_true", help="LLaVA-1.5: pad to a square, as LLaVA's evaluation")
    add_device_flags(p)
    args = p.parse_args(argv)
    check_number("--limit", args.limit, 1, math.inf)
    check_number("--max-new-tokens", args.max_new_tokens, 1, math.inf)
    check_number("--tau", args.tau, 0, math.inf)
    check_not_empty(args, "data", "images", "model", "out")
    if args.benchmark == "jsonl" and args.data is None:
        raise UsageError("--benchmark jsonl needs --data FILE")
    args.configs = [name for name in args.configs.split(",") if name]
    if args.figure2 and "full" not in args.configs:
        raise UsageError("--figure2 measures the full configuration: add full to --configs")
    if not args.configs or len(set(args.configs)) != len(args.configs):
        raise UsageError("--configs needs distinct configuration names, e.g. full,todre-0.10")
    return args


def settings_for(name: str, args) -> todre.Settings:
    """A configuration name (todre.parse_config, as bench.py) with --tau and --newlines applied
    where the configuration uses that stage."""
    try:
        settings = todre.parse_config(name)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0] + " (see --help for the names)") from None
    if args.tau is not None and settings.tau > 0:
        settings = replace(settings, tau=args.tau)
    if args.newlines is not None and settings.stage1:
        settings = replace(settings, newlines=args.newlines)
    return settings


def load_samples(args) -> list[Sample]:
    images = Path(args.images) if args.images else None
    if args.data is None:  # the benchmark straight from the Hub
        samples = load_parquet(download_hub(args.benchmark), args.benchmark)
        return samples[: args.limit] if args.limit else samples
    data = Path(args.data)
    for path, what in ((data, "--data"), (images, "--images")):
        if path is not None and not path.exists():
            raise UsageError(f"{what} {path} does not exist")
    if args.benchmark == "pope":
        samples = load_pope(data, images)
    elif args.benchmark == "mme":
        samples = load_mme(data)
    else:
        if not data.is_file():
            raise UsageError(f"--data {data} must be a .jsonl file of questions")
        samples = load_jsonl(data, images)
    return samples[: args.limit] if args.limit else samples


def question_text(sample: Sample, benchmark: str) -> str:
    """The prompt's question: for MME, lmms-eval drops its " Please answer yes or no." before adding
    the suffix; POPE and jsonl questions are used as they are."""
    question = sample.question.strip()
    if benchmark == "mme":
        question = question.replace(" Please answer yes or no.", "")
    return question + SUFFIX


def parse(answer: str, benchmark: str, parser: str, label: str) -> str:
    """The prediction an answer counts as: yes/no/other for yes/no questions (MME by lmms-eval's
    rule, POPE and yes/no jsonl questions by --parser), else the normalised text."""
    if benchmark == "mme":
        return parse_mme(answer)
    if benchmark == "pope" or label.strip().lower() in ("yes", "no"):
        return PARSERS[parser](answer)
    return normalize(answer)


@dataclass
class Process:
    """Where this process stands: one of torchrun's ranks, or the only one."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def start(cls, device_name: str) -> "Process":
        """torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK): NCCL on GPUs,
        gloo on CPUs; a process started without torchrun is rank 0 of 1."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        import torch.distributed as dist

        gpu = torch.cuda.is_available() and device_name in ("auto", "cuda")
        dist.init_process_group("nccl" if gpu else "gloo")
        return cls(dist.get_rank(), world_size, int(os.environ.get("LOCAL_RANK", "0")))

    def device(self, name: str) -> torch.device:
        device = pick_device(name)
        if device.type == "cuda" and self.world_size > 1:  # one GPU per rank on its node
            torch.cuda.set_device(self.local_rank)
            return torch.device("cuda", self.local_rank)
        return device

    def gather(self, items: list) -> list:
        """Every rank's list, concatenated in rank order, on every rank."""
        if self.world_size == 1:
            return items
        import torch.distributed as dist

        everyone = [None] * self.world_size
        dist.all_gather_object(everyone, items)
        return [item for part in everyone for item in part]

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    def finish(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.destroy_process_group()


@torch.inference_mode()
def answer(
    model,
    tokenizer,
    visual,
    settings: todre.Settings,
    question: str,
    max_new_tokens: int,
    device,
    every_layer_ratios: bool = False,
):
    """One question under one configuration: (answer text, visual tokens kept, prompt length,
    eviction layer, eq. 7 ratios by layer)."""
    kept = model.select(visual, settings)
    ids = llava.prompt_ids(tokenizer, question, len(kept)).to(device)
    model.check_generation(ids, visual.tokens[kept], max_new_tokens, 0.0)
    kv_cache = model.new_kv_cache(max_new_tokens)
    logits, info = model.prefill(ids, visual.tokens[kept], settings, kv_cache, every_layer_ratios=every_layer_ratios)
    tokens = list(model.decode(logits[0, -1], len(ids), kv_cache, max_new_tokens))
    return tokenizer.decode(tokens), len(kept), len(ids), info.evict_layer, info.ratios


def evaluate(args) -> dict | None:
    """Answer this process's share of the questions; rank 0 then scores everything: results.json
    (returned; None on the other ranks)."""
    configs = {name: settings_for(name, args) for name in args.configs}
    samples = load_samples(args)
    process = Process.start(args.device)
    try:
        out = Path(args.out or f"eval-{args.benchmark}")
        predictions = {name: Predictions(out / name, process.rank, process.world_size) for name in configs}
        missing = [s for s in samples if s.blob is None and not os.path.isfile(s.image)]
        if missing and not args.skip_bad:
            more = f" (and {len(missing) - 1} more; --skip-bad skips them)" if len(missing) > 1 else ""
            raise DataError(f"{missing[0].source}: image not found: {missing[0].image}{more}")
        skipped = [{"question": s.source, "reason": f"image not found: {s.image}"} for s in missing]
        mine = samples[process.rank :: process.world_size]  # every N-th question, in file order
        todo = [s for s in mine if s not in missing and any(s.key not in p.done for p in predictions.values())]
        device = process.device(args.device)
        model, tokenizer = llava.load(args.model, device, pick_dtype(args.dtype, device))
        skipped += process.gather(run_samples(model, tokenizer, todo, configs, predictions, args, device, process))
        process.barrier()  # every rank's predictions are on disk
        if process.rank != 0:
            return None
        merged = {name: Predictions(out / name) for name in configs}  # all ranks' files, read again
        return results(args, model, merged, samples, skipped, out, process.world_size)
    finally:
        process.finish()


def run_samples(model, tokenizer, todo, configs, predictions, args, device, process) -> list[dict]:
    """Each sample: its image encoded once, then answered under every configuration still missing
    it. Returns the questions skipped for a damaged image (with --skip-bad)."""
    from tqdm import tqdm

    skipped, embedded = [], ParquetImages()
    bar = tqdm(todo, desc="questions", unit="q", file=sys.stderr, disable=not todo or process.rank != 0)
    for sample in bar:
        try:
            image = embedded.open(sample) if sample.blob else open_image(sample.image)
        except MediaError as e:
            if not args.skip_bad:
                raise DataError(f"{sample.source}: {e}") from None
            skipped.append({"question": sample.source, "reason": str(e)})
            continue
        start = llava.now(device)
        visual = model.encode_image(image, pad_to_square=args.pad_to_square)
        vision_s = llava.now(device) - start
        for name, settings in configs.items():
            if sample.key in predictions[name].done:
                continue
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = llava.now(device)
            figure2 = args.figure2 and name == "full"
            text, kept, prompt_len, evict_layer, ratios = answer(
                model,
                tokenizer,
                visual,
                settings,
                question_text(sample, args.benchmark),
                args.max_new_tokens,
                device,
                figure2,
            )
            seconds = vision_s + llava.now(device) - start  # a run of this config alone pays the encoder too
            prefill_flops, _ = todre.paper_flops(model.config.text, prompt_len, kept, evict_layer, 0)
            record = {
                "question_id": sample.question_id,
                "image": sample.image,
                "category": sample.category,
                "question": sample.question,
                "answer": text,
                "pred": parse(text, args.benchmark, args.parser, sample.label),
                "label": sample.label,
                "visual_tokens": kept,
                "evict_layer": evict_layer,
                "seconds": seconds,
                "prefill_tflops": prefill_flops / 1e12,
                "peak_memory_mb": llava.peak_memory_mb(device),
            }
            if figure2:
                record["ratios"] = {str(layer): list(pair) for layer, pair in ratios.items()}
            predictions[name].append(record)
    bar.close()
    return skipped


def results(args, model, predictions, samples, skipped, out: Path, world_size: int) -> dict:
    """results.json (and figure2.json) from every prediction on disk for the questions of this run."""
    order = {s.key: i for i, s in enumerate(samples)}  # whatever process answered what, in file order
    score = {"pope": pope_metrics, "mme": mme_metrics, "jsonl": jsonl_metrics}[args.benchmark]
    rows = {}
    for name, files in predictions.items():
        records = [r for r in files.records if (r["category"], r["question_id"]) in order]
        records.sort(key=lambda r: order[(r["category"], r["question_id"])])
        seconds = sum(r["seconds"] for r in records)
        rows[name] = {
            "samples": len(records),
            "samples_per_s": ratio(len(records), seconds),  # per process
            "mean_visual_tokens": ratio(sum(r["visual_tokens"] for r in records), len(records)),
            "evict_layer_histogram": dict(
                Counter("none" if r["evict_layer"] is None else str(r["evict_layer"]) for r in records)
            ),
            "mean_prefill_tflops": ratio(sum(r["prefill_tflops"] for r in records), len(records)),
            "peak_memory_mb": max((r["peak_memory_mb"] for r in records), default=0.0),
            "metrics": score(records) if records else {},
            "unparseable": sum(r["pred"] == "other" for r in records),
        }
        if args.figure2 and name == "full":
            write_figure2(records, model, out)
    full = rows.get("full", {}).get("metrics")
    for row in rows.values():
        row["relative"] = relative(row["metrics"], full or {})
    result = {
        "benchmark": args.benchmark,
        "model": args.model,
        "world_size": world_size,
        "parser": args.parser,
        "configs": rows,
        "skipped": sorted(skipped, key=lambda s: s["question"]),
    }
    write_json(out / "results.json", result)
    return result


def write_json(path: Path, value) -> None:
    """Written whole or not at all (a temporary file renamed over it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(value, indent=1))
    os.replace(tmp, path)


def write_figure2(records: list[dict], model, out: Path) -> None:
    """The paper's Figure 2 for this model and data: eq. 7's a_tv and a_vt at every decoder layer,
    averaged over the questions, with the probe layers and tau of the paper's v1 for reference.
    figure2.json always; figure2.png where matplotlib is installed (it is optional)."""
    measured = [r["ratios"] for r in records if r.get("ratios")]
    layers = sorted({int(layer) for ratios in measured for layer in ratios})
    mean = {
        layer: [
            ratio(sum(r[str(layer)][i] for r in measured if str(layer) in r), sum(str(layer) in r for r in measured))
            for i in (0, 1)
        ]
        for layer in layers
    }
    figure = {
        "samples": len(measured),
        "layers": layers,
        "a_tv": [mean[layer][0] for layer in layers],
        "a_vt": [mean[layer][1] for layer in layers],
        "probe_layers": todre.probe_layers(model.config.text.num_hidden_layers),
        "tau": todre.Settings().tau,
    }
    write_json(out / "figure2.json", figure)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("figure2.json written; figure2.png needs matplotlib: pip install matplotlib", file=sys.stderr)
        return
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(layers, figure["a_tv"], marker="o", label="a_tv: text to visual")
    ax.plot(layers, figure["a_vt"], marker="s", label="a_vt: visual to text")
    for layer in figure["probe_layers"]:
        ax.axvline(layer, color="grey", linestyle=":", linewidth=1)
    ax.axhline(figure["tau"], color="red", linestyle="--", linewidth=1, label=f"tau = {figure['tau']}")
    ax.set_xlabel("decoder layer (0-based; dotted: probe layers)")
    ax.set_ylabel("attention share (eq. 7)")
    ax.set_title(f"Cross-modal attention by depth, {figure['samples']} questions")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "figure2.png", dpi=120)
    plt.close(fig)


def markdown_table(result: dict) -> str:
    """The paper's table: the headline metrics per configuration, the last relative to full, and cost."""
    rows = result["configs"]
    metrics = next((row["metrics"] for row in rows.values() if row["metrics"]), {})
    if result["benchmark"] == "mme":
        columns = [("perception", lambda m: m.get("perception")), ("cognition", lambda m: m.get("cognition"))]
    elif "mean_f1" in metrics:
        categories = [c for c in metrics if isinstance(metrics[c], dict)]
        columns = [(f"F1 {c}", lambda m, c=c: m.get(c, {}).get("f1")) for c in categories]
        columns.append(("mean F1", lambda m: m.get("mean_f1")))
    else:
        columns = [("accuracy", lambda m: m.get("accuracy"))]
    digits = 1 if result["benchmark"] == "mme" else 4
    headline, get_headline = columns[0] if result["benchmark"] == "mme" else columns[-1]
    lines = [
        "| config | samples | visual tokens | "
        + " | ".join(name for name, _ in columns)
        + f" | {headline} vs full | samples/s | prefill TFLOPs |",
        "|---" * (len(columns) + 6) + "|",
    ]
    for name, row in rows.items():
        cells = ["-" if (v := get(row["metrics"])) is None else f"{v:.{digits}f}" for _, get in columns]
        rel = get_headline(row["relative"]) if row["relative"] else None
        lines.append(
            f"| {name} | {row['samples']} | {row['mean_visual_tokens']:.0f} | "
            + " | ".join(cells)
            + f" | {'-' if rel is None else f'{100 * rel:.1f}%'} | {row['samples_per_s']:.2f}"
            f" | {row['mean_prefill_tflops']:.3f} |"
        )
    unparseable = {name: row["unparseable"] for name, row in rows.items() if row["unparseable"]}
    if unparseable:
        lines.append("\nunparseable answers (counted wrong): " + ", ".join(f"{n} {c}" for n, c in unparseable.items()))
    if result["skipped"]:
        lines.append(f"\n{len(result['skipped'])} question(s) skipped (listed in results.json)")
    return "\n".join(lines)


def main(argv=None) -> int:
    """User and data errors as one stderr line and exit code 2, Ctrl-C as a quiet 130 (the
    predictions written so far stay; the same command continues)."""
    try:
        args = parse_args(argv)
        result = evaluate(args)
        if result is not None:  # rank 0, or the only process
            print(markdown_table(result))
        return 0
    except (UsageError, DataError, MediaError, llava.CheckpointError, llava.InputError) as e:
        rank = int(os.environ.get("RANK", "0"))
        if rank == 0 or not isinstance(e, UsageError):  # every rank sees the same bad command line: one says it
            print(f"error: {'' if rank == 0 else f'rank {rank}: '}{e}", file=sys.stderr)
        return 2
    except OSError as e:  # the output folder: full disk, permissions
        print(f"error: cannot write the results: {os_error_text(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    if CTRL_C_HANDLED:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    code = main()
    if CTRL_C_HANDLED:
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.exit(code)
