"""Answering a benchmark's questions in bulk, under several pruning configurations, without ever
losing or mixing up an answer.

- Questions are answered grouped by image: each image is read and encoded once, and Stage 1 runs
  once per (image, configuration), since it never looks at the question (paper §4.1). Every
  question about the image reuses them; answers are the same as encoding anew each time.
- Each answer is appended to <config>/predictions.jsonl at once, so an interrupted run loses at
  most the question in flight and a rerun continues. A run's folder records the fingerprint of
  everything that changes an answer; a rerun with another fingerprint is refused.
- One run at a time per folder (a lock file names the holder's pid).
"""

import fcntl
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import files
import todre
from evaluation import batched, flops
from evaluation.benchmarks import DataError, EmbeddedImages, Question, parse_json, read_json, read_text
from media import MediaError, open_image, open_image_bytes
from model import ContextError, Llava, ask, check_generation, placement, prompt_ids

# ---------------------------------------------------------------------------------------------
# Predictions on disk
# ---------------------------------------------------------------------------------------------

RANK_FILE = re.compile(r"predictions\.rank(\d+)\.jsonl")
RECORD_FIELDS = {"question_id": str, "category": str, "question": str, "answer": str, "prompt": str}
# Numbers a record may hold, which results.json adds up; these may also be null: no eviction, or an
# answer of a batch not timed alone.
NULLABLE = ("evict_layer", "seconds_alone")
NUMBER_FIELDS = ("visual_tokens", "evict_layer", "new_tokens", "seconds", "seconds_alone", "prefill_tflops")
NUMBER_FIELDS += ("peak_memory_mb",)


class Predictions:
    """<config>/predictions.jsonl (one process) or predictions.rank<R>.jsonl (rank R under torchrun):
    one JSON line per answered question, appended and flushed at once. Together the files are what
    has been answered: a question counts once, from the first file that has it, whatever number of
    processes wrote them. A last line cut off by a kill is dropped (from this process's own file)."""

    def __init__(self, folder: Path, rank: int = 0, world_size: int = 1):
        self.folder = folder
        self.path = folder / ("predictions.jsonl" if world_size == 1 else f"predictions.rank{rank}.jsonl")
        self.records = self.read_all()
        self.done = {(r["category"], r["question_id"]): r for r in self.records}

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        ranks = sorted(
            (p for p in self.folder.iterdir() if RANK_FILE.fullmatch(p.name)),
            key=lambda p: int(RANK_FILE.fullmatch(p.name)[1]),
        )
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
        """A predictions file's records, each checked; a damaged line other than a cut-off last one
        is a DataError naming it."""
        text = read_text(path)
        lines = text.split("\n")
        records = []
        for number, line in enumerate(lines, start=1):
            if not line:
                continue
            last = number == len(lines)  # the final line has no newline: a write that was cut off
            try:
                record = parse_json(line, f"{path}:{number}")
                check_record(record, f"{path}:{number}")
            except DataError as e:
                if not last:
                    raise DataError(f"{e}; remove that line (or the file) to redo its questions") from None
                record = None
            if last:  # complete or not, a record without its newline is written again or dropped
                if repair:
                    keep = "".join(line + "\n" for line in lines[:-1] if line)
                    keep += json.dumps(record) + "\n" if record is not None else ""
                    files.write_atomic(path, keep)  # a new file renamed over the old: a kill loses nothing
                if record is None:
                    continue
            records.append(record)
        return records

    def append(self, record: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.records.append(record)
        self.done[(record["category"], record["question_id"])] = record


def check_record(record, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: a prediction must be a JSON object")
    for name, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(name), kind):
            raise DataError(f"{where}: a prediction needs {name} ({kind.__name__})")
    for name in NUMBER_FIELDS:
        value = record.get(name)
        if name in record and not (value is None and name in NULLABLE) and not is_number(value):
            raise DataError(f"{where}: {name} must be a number, got {value!r}")


def is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# ---------------------------------------------------------------------------------------------
# What an output folder was answered with, and who is writing it
# ---------------------------------------------------------------------------------------------


WEIGHT_SAMPLES, SAMPLE_BYTES = 16, 1 << 16  # what of each weight file the identity reads: 1 MiB


def checkpoint_identity(directory: Path) -> dict:
    """What identifies a checkpoint, cheaply: the sha256 of every file the loader reads besides the
    weights (configs, processor and generation settings, tokenizer, chat templates), and per weight
    file a sha256 of its safetensors header (every tensor's name, dtype, shape and offsets) and of
    16 evenly spaced 64 KiB samples of its data. Reading all of 14 GB would take minutes; what this
    cannot see is a change confined to bytes between the samples that keeps every shape."""
    digest = hashlib.sha256()
    for path in sorted(directory.iterdir()):
        if path.is_file() and (path.suffix in (".json", ".jinja") or path.name.startswith("tokenizer.")):
            digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    weights = {path.name: weight_identity(path) for path in sorted(directory.glob("*.safetensors"))}
    return {"files_sha256": digest.hexdigest(), "weights": weights}


def weight_identity(path: Path) -> str:
    """sha256 of a safetensors file's size, header and sampled data (see checkpoint_identity)."""
    digest = hashlib.sha256()
    size = path.stat().st_size
    digest.update(str(size).encode())
    with open(path, "rb") as f:
        header = int.from_bytes(f.read(8), "little")
        digest.update(f.read(min(header, size)))
        for i in range(WEIGHT_SAMPLES):
            f.seek(8 + header + (size - 8 - header) * i // WEIGHT_SAMPLES)
            digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def image_digest(question: Question, embedded: EmbeddedImages) -> str | None:
    """sha256 of the bytes of a question's image (a file, or embedded in the data); None when it
    has none or it cannot be read (answering then says why)."""
    if question.image is None:
        return None
    try:
        if question.blob is not None:
            return hashlib.sha256(embedded.read(question)).hexdigest()
        with open(question.image, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()
    except (OSError, DataError):
        return None


def fingerprint(checkpoint: dict, model: Llava, tokenizer, settings: todre.Settings, **run) -> dict:
    """Everything that changes an answer of one configuration."""
    settings_fields = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    if settings.pivot == "attention":  # the default pivot: absent, as before the option existed (runs resume)
        del settings_fields["pivot"], settings_fields["pivot_seed"]
    return {
        "checkpoint": checkpoint,
        "dtype": str(model.dtype).removeprefix("torch."),
        "device": model.device.type,
        "settings": settings_fields,
        "conversation": tokenizer.format.name,
        "chat_template_sha256": hashlib.sha256((tokenizer.format.chat_template or "").encode()).hexdigest(),
        **run,
    }


def check_fingerprint(folder: Path, expected: dict, write: bool, adopt: bool = False) -> None:
    """Refuse to add answers made another way to a folder; record the fingerprint of a new one."""
    path = folder / "fingerprint.json"
    if path.exists():
        found = read_json(path)
        if found != expected and adopt and write and older_release(found):
            write_json(path, expected)  # --adopt: an older release's answers, taken as this run's
        elif found != expected and older_release(found):
            raise DataError(
                f"{folder} holds answers fingerprinted by an older release, which did not record the weights' "
                "contents: adopt them as this run's, or discard them",
                "--adopt, or --overwrite",
            )
        elif found != expected:
            shown = ", ".join(
                f"{k}: {describe(old)} -> {describe(new)}" for k, old, new in differences(found, expected)[:4]
            )
            raise DataError(
                f"{folder} holds answers made with other settings ({shown}): use another output folder, or "
                "start these answers over",
                "--out DIR, or --overwrite",
            )
    elif write:
        if Predictions(folder).files() and not adopt:
            raise DataError(
                f"{folder} holds answers but no fingerprint.json (an older release's, or copied in): nothing says "
                "how they were made; adopt them as this run's, or discard them",
                "--adopt, or --overwrite",
            )
        folder.mkdir(parents=True, exist_ok=True)
        write_json(path, expected)


def older_release(found) -> bool:
    """A fingerprint written before weight contents were identified (weights listed by name and size)."""
    return isinstance(found, dict) and isinstance(found.get("checkpoint", {}).get("weights"), list)


def differences(found, expected, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, found value, expected value) wherever two fingerprints differ."""
    if not (isinstance(found, dict) and isinstance(expected, dict)):
        return [] if found == expected else [(prefix or "fingerprint", found, expected)]
    out = []
    for key in sorted(found.keys() | expected.keys()):
        out += differences(found.get(key), expected.get(key), f"{prefix}.{key}" if prefix else key)
    return out


def describe(value) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= 60 else text[:57] + "..."


class FolderLock:
    """An exclusive lock on an output folder for as long as this process runs there; a second
    run into it is refused, naming the holder's pid."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / ".lock"
        self.file = open(self.path, "a+", encoding="utf-8")  # noqa: SIM115 (held until release)
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "unknown"
            self.file.close()
            raise DataError(
                f"{folder} is in use by another evaluate.py run (pid {holder}): wait for it to end"
            ) from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(str(os.getpid()))
        self.file.flush()

    def release(self) -> None:
        self.file.close()


def write_json(path: Path, value) -> None:
    """files.write_json into a folder made if needed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_json(path, value)


# ---------------------------------------------------------------------------------------------
# Answering
# ---------------------------------------------------------------------------------------------


def image_groups(questions: list[Question]) -> list[list[Question]]:
    """The questions grouped by image, groups in the order their first question comes; a question
    without an image is a group of its own."""
    groups = {}
    for q in questions:
        key = q.image_key if q.image is not None else ("no image", q.key)
        groups.setdefault(key, []).append(q)
    return list(groups.values())


@dataclass
class Job:
    """What answering needs besides the model: the settings by configuration name, where the
    answers go, and how to measure."""

    configs: dict[str, todre.Settings]
    predictions: dict[str, Predictions]
    max_new_tokens: int
    clock: Callable[[], float] = time.perf_counter
    peak_memory_mb: Callable[[], float] = lambda: 0.0
    reset_peak: Callable[[], None] = lambda: None
    pad_to_square: bool = False
    reuse: bool = True  # one encode and one Stage 1 per image; False: anew for every answer
    figure2: bool = False  # eq. 7 at every layer in the full configuration
    skip_bad: bool = False
    read: Callable[[str, Question], object] = lambda answer, question: answer  # the benchmark's reader
    batch_size: int = 1  # questions about one image answered together on one shared prefix; 1: one at a time
    # Batched: every this-many-th image group's first question is also answered alone, to time it
    # (seconds_alone); 0: none (bench.py times the single path itself).
    sample_alone_every: int = 8


class Answerer:
    """Answers groups of questions about one image, under every configuration still missing them."""

    def __init__(self, model: Llava, tokenizer, job: Job):
        self.model, self.tokenizer, self.job = model, tokenizer, job
        self.embedded = EmbeddedImages()
        self.skipped: list[dict] = []
        self.digest: str | None = None  # sha256 of the image of the group being answered
        self.batched_groups: dict[str, int] = {}  # per configuration: image groups answered in batches

    def open(self, q: Question):
        """The question's image, or None after recording it as skipped (--skip-bad)."""
        try:
            return open_image_bytes(self.embedded.read(q), q.source) if q.blob is not None else open_image(q.image)
        except (MediaError, DataError) as e:
            if not self.job.skip_bad:
                raise DataError(f"{q.source}: {e}") from None
            self.skipped.append({"question": q.source, "reason": str(e)})
            return None

    def encode(self, image) -> tuple:
        start = self.job.clock()
        visual = self.model.encode_image(image, pad_to_square=self.job.pad_to_square)
        return visual, self.job.clock() - start

    @torch.inference_mode()
    def group(self, questions: list[Question]) -> None:
        job = self.job
        todo = {name: [q for q in questions if q.key not in job.predictions[name].done] for name in job.configs}
        answers = sum(len(qs) for qs in todo.values())
        if not answers:
            return
        with_image = questions[0].image is not None
        image = self.open(questions[0]) if with_image else None
        self.digest = image_digest(questions[0], self.embedded) if image is not None else None
        if with_image and image is None:
            self.skipped += [
                {"question": q.source, "reason": "the image of " + questions[0].source} for q in questions[1:]
            ]
            return
        visual, encode_s = self.encode(image) if with_image and job.reuse else (None, 0.0)
        for name, settings in job.configs.items():
            if not todo[name]:
                continue
            kept, select_s = None, 0.0
            if visual is not None and job.reuse:
                start = job.clock()
                kept = self.model.select(visual, settings)
                select_s = job.clock() - start
            batchable = visual is not None and job.reuse and job.batch_size > 1 and not (job.figure2 and name == "full")
            if batchable and self.batches(todo[name], name, settings, visual, kept, encode_s, select_s, answers):
                continue
            for q in todo[name]:
                if with_image and not job.reuse:  # what a harness without reuse does: encode anew, Stage 1 in ask
                    visual, encode_s = self.encode(image)
                    kept, select_s = None, 0.0
                try:
                    record = self.answer(q, name, settings, visual, kept, encode_s, select_s, answers, len(todo[name]))
                except ContextError as e:  # this question does not fit: say which, or skip it (--skip-bad)
                    if not job.skip_bad:
                        raise ContextError(f"{q.source}: {e}", e.visual) from None
                    self.skipped.append({"question": q.source, "config": name, "reason": str(e)})
                    continue
                job.predictions[name].append(record)

    def batches(self, questions, name, settings, visual, kept, encode_s, select_s, answers) -> bool:
        """The questions answered in batches of job.batch_size on one shared prefix (batched.py),
        each stored at once; False, answering nothing, where their prompts share no prefix.

        `seconds` spreads the prefix and each batch over the answers that used them. The first
        question of every job.sample_alone_every-th group is also answered alone, and only its
        record has a measured `seconds_alone` (results.json says how many were measured)."""
        job, model = self.job, self.model
        prompts = [prompt_ids(self.tokenizer, q.text, len(kept)).to(model.device) for q in questions]
        p = batched.shared_prefix(prompts, model.is_visual)
        if p is None:
            return False
        fits = []
        for q, ids in zip(questions, prompts, strict=True):
            try:
                check_generation(model, ids, visual.tokens[kept], job.max_new_tokens, 0.0)
                fits.append((q, ids))
            except ContextError as e:
                if not job.skip_bad:
                    raise ContextError(f"{q.source}: {e}", e.visual) from None
                self.skipped.append({"question": q.source, "config": name, "reason": str(e)})
        if not fits:
            return True
        start = job.clock()
        where = placement([visual], [kept])  # Qwen2.5-VL's M-RoPE places the kept tokens; LLaVA: None
        prefix = batched.prefill_prefix(model, fits[0][1][:p], visual.tokens[kept], where)
        prefix_s = job.clock() - start
        every, done = job.sample_alone_every, self.batched_groups.get(name, 0)
        self.batched_groups[name] = done + 1
        alone = None
        if every and done % every == 0:  # timed alone as well: the paper's one-question-at-a-time cost
            alone = self.answer(fits[0][0], name, settings, visual, kept, encode_s, select_s, answers, len(fits))
        for first in range(0, len(fits), job.batch_size):
            chunk = fits[first : first + job.batch_size]
            job.reset_peak()
            start = job.clock()
            chunk_ids = [ids for _, ids in chunk]
            rows = batched.answer_batch(model, chunk_ids, p, prefix, settings, job.max_new_tokens, placement=where)
            batch_s = job.clock() - start
            for (q, ids), row in zip(chunk, rows, strict=True):
                text = self.tokenizer.decode(row.token_ids)
                shared = encode_s / answers + select_s / len(fits) + prefix_s / len(fits)
                record = self.record(
                    q, visual, kept, ids, text, row.info, len(row.token_ids), shared + batch_s / len(chunk)
                )
                record["seconds_alone"] = alone["seconds_alone"] if alone and q is fits[0][0] else None
                job.predictions[name].append(record)
        return True

    def record(self, q, visual, kept, ids, text, info, new_tokens: int, seconds: float) -> dict:
        """One predictions.jsonl record (LLaVA's scripts strip the decoded answer; so do we)."""
        visual_tokens = 0 if kept is None else len(kept)
        prefill_flops, _ = flops.paper_flops(self.model.config.text, len(ids), visual_tokens, info.evict_layer, 0)
        return {
            "question_id": q.question_id,
            "category": q.category,
            "image": q.image,
            "question": q.text,
            "prompt": self.tokenizer.conversation(q.text, with_media=visual is not None),
            "answer": text.strip(),
            # what this run's reader made of it, and the expected answer, for people reading the file;
            # results.json reads `answer` again every time, against the data's current labels
            "pred": self.job.read(text.strip(), q),
            "label": q.label if q.label is not None else q.answers,
            "visual_tokens": visual_tokens,
            "evict_layer": info.evict_layer,
            "new_tokens": new_tokens,
            "seconds": seconds,
            "prefill_tflops": prefill_flops / 1e12,
            "peak_memory_mb": self.job.peak_memory_mb(),
            "image_sha256": self.digest,  # the bytes it was asked about: a resume checks they are the same
        }

    def answer(self, q, name, settings, visual, kept, encode_s, select_s, answers, asked) -> dict:
        """One question under one configuration, as its predictions.jsonl record. `seconds` is what
        it cost in this run (the shared encode and Stage 1 spread over the answers that used them),
        `seconds_alone` what it costs answered on its own (the paper's Table 3 throughput)."""
        job = self.job
        job.reset_peak()
        figure2 = job.figure2 and name == "full"
        reply = ask(
            self.model,
            self.tokenizer,
            q.text,
            visual,
            settings,
            job.max_new_tokens,
            kept=kept,
            every_layer_ratios=figure2,
            clock=job.clock,
        )
        if kept is None and visual is not None:  # Stage 1 ran inside ask (no reuse)
            select_s = reply.select_s
        own = reply.prefill_s + reply.decode_s
        shared = (encode_s / answers + select_s / asked) if job.reuse else encode_s + select_s
        record = self.record(q, visual, reply.kept, reply.prompt_ids, reply.text, reply.info, len(reply.token_ids), 0.0)
        record["seconds"], record["seconds_alone"] = shared + own, encode_s + select_s + own
        if figure2:
            record["ratios"] = {str(layer): list(pair) for layer, pair in reply.info.ratios.items()}
        return record


def todo_groups(questions: list[Question], predictions: dict[str, Predictions], rank: int, world: int) -> list:
    """This process's share: whole image groups, every world-th from the rank-th, of those that some
    configuration still misses; a stored answer to a question asked differently, or about other
    image bytes than the image now has, is refused (each rank hashes the images of its own share)."""
    mine, embedded = [], EmbeddedImages()
    for i, group in enumerate(image_groups(questions)):
        if i % world == rank:
            check_image_unchanged(group, predictions, embedded)
        for q in group:
            for p in predictions.values():
                stored = p.done.get(q.key)
                if stored is not None and stored["question"] != q.text:
                    raise DataError(
                        f"{p.folder}: question {q.question_id!r} ({q.category}) was answered for another text "
                        f"({stored['question'][:40]!r}); these are other questions: use another output folder, or "
                        "start these answers over",
                        "--out DIR, or --overwrite",
                    )
        if i % world == rank and any(q.key not in p.done for q in group for p in predictions.values()):
            mine.append(group)
    return mine


def check_image_unchanged(group: list[Question], predictions: dict[str, Predictions], embedded) -> None:
    """A DataError if a stored answer about this group's image was made from other bytes (another
    --images folder, a replaced file): its answers would be mixed with answers about other pixels."""
    stored = [(p, p.done[q.key]) for q in group for p in predictions.values() if q.key in p.done]
    recorded = {record.get("image_sha256") for _, record in stored} - {None}
    if not recorded:
        return
    now = image_digest(group[0], embedded)
    if now is not None and recorded != {now}:
        folder, record = next((p.folder, r) for p, r in stored if r.get("image_sha256") not in (None, now))
        raise DataError(
            f"{folder}: question {record['question_id']!r} ({record['category']}) was answered about other image "
            f"bytes than {group[0].image} holds now: use another output folder, or start these answers over",
            "--out DIR, or --overwrite",
        )
