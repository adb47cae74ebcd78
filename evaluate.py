"""Reproduce the paper's Table 1 (and Table 4): LLaVA's own evaluation of the 8 image benchmarks,
under several pruning configurations in one run, scored as LLaVA and its pruning peers score them.

    python evaluate.py --benchmark table1 --data playground/data/eval --configs full,todre-0.25,todre-0.10
    python evaluate.py --benchmark pope --data POPE/output/coco --images val2014
    python evaluate.py --benchmark mme,gqa              # no --data: lmms-lab's copies from the Hub (pyarrow)
    python evaluate.py --benchmark sqa --data DIR --score answers.jsonl   # score LLaVA-format answers
    torchrun --nproc-per-node 8 evaluate.py ...         # image groups spread over 8 GPUs

The model loads once. Questions are answered grouped by image, each image encoded once and Stage 1
run once per configuration (--no-image-cache: anew for every answer); the decoder prefix up to the
last visual token is computed once per (image, configuration) and the questions about it are
answered --batch-size at a time on top of it (evaluation/batched.py; --no-prefix-cache or
--batch-size 1: one at a time, the prefix recomputed, the same answers). Every answer is appended to
OUT/[benchmark/]<config>/predictions.jsonl at once, so an interrupted run loses at most the
question in flight, and the same command continues; scores are recomputed from the stored answers
into results.json, answers.jsonl (LLaVA's format), and OUT/table.md and table.json.
"""

import cli

CTRL_C_HANDLED = cli.quiet_ctrl_c(__name__)  # before the slow imports (torch)

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

import files
import todre
from checkpoint import DEFAULT_MODEL, CheckpointError, resolve_checkpoint
from cli import UsageError
from evaluation import configs, tables
from evaluation.benchmarks import (
    BENCHMARKS,
    TABLES,
    Benchmark,
    DataError,
    Question,
    json_lines,
    limit,
    load_questions,
    subfolder,
)
from evaluation.runner import (
    Answerer,
    FolderLock,
    Job,
    Predictions,
    check_fingerprint,
    checkpoint_identity,
    fingerprint,
    todo_groups,
    write_json,
)
from evaluation.scoring import ratio
from files import os_error_text
from media import MediaError
from model import ContextError, InputError, load
from qwen import QwenVL, set_pixel_budget

# ---------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------


def parse_args(argv):
    """The flags, checked: a UsageError names the first one that cannot be used."""
    args = flags().parse_args(argv)
    check_args(args)
    return args


def flags() -> cli.Parser:
    p = cli.Parser(
        description=__doc__.split("\n")[0],
        epilog=configs.CONFIG_NAMES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    names = ", ".join(BENCHMARKS)
    p.add_argument(
        "--benchmark",
        required=True,
        help=f"one or more of {names} (comma-separated), or table1 (the 8 of Table 1) or table4 (MME, "
        "ScienceQA, GQA, POPE)",
    )
    p.add_argument(
        "--data",
        help="LLaVA's evaluation folder (playground/data/eval, with each benchmark's files in its own "
        "subfolder), one benchmark's folder, or the original POPE/MME layouts; a .jsonl for jsonl. "
        "Omitted: lmms-lab's copies from the Hugging Face Hub",
    )
    p.add_argument("--images", help="the images folder, where it is not the layout's own (POPE: COCO val2014)")
    p.add_argument("--split", choices=["test", "val"], help="vizwiz, vqav2: test (EvalAI upload) or val (scored here)")
    p.add_argument("--model", default=DEFAULT_MODEL, help="Hub id or local checkpoint directory")
    p.add_argument("--configs", default="full,todre-0.25,todre-0.10", help="comma-separated configuration names")
    p.add_argument("--limit", type=int, help="only the first N questions of every category")
    p.add_argument("--out", help="output folder (default: eval-<benchmark>)")
    p.add_argument("--overwrite", action="store_true", help="discard the answers already in --out and start over")
    p.add_argument(
        "--adopt",
        action="store_true",
        help="take answers in --out that have no fingerprint.json (an older release's) as made by this run's settings",
    )
    p.add_argument(
        "--score",
        metavar="ANSWERS",
        help="score an answers file in LLaVA's format (question_id, text) instead of running a model",
    )
    p.add_argument(
        "--parser",
        choices=["llava", "lmms-eval"],
        default="llava",
        help="POPE and MME answers: LLaVA's scripts' reading (default) or lmms-eval's",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip (and count in results.json) questions whose image is missing or damaged, "
        "or whose prompt does not fit the context, instead of stopping with an error",
    )
    p.add_argument(
        "--max-new-tokens", type=int, help="default: LLaVA's for the benchmark (128; ScienceQA, MMBench 1024)"
    )
    p.add_argument(
        "--no-image-cache", action="store_true", help="encode every image anew for every answer (to measure)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        help="questions about one image answered together on one shared prefix (default: 8 on a GPU, 4 on a CPU; "
        "1: one at a time, the prefix recomputed for each, as without batching)",
    )
    p.add_argument(
        "--no-prefix-cache",
        action="store_true",
        help="answer one question at a time, recomputing the image's prefix for each (the same answers, slower)",
    )
    p.add_argument(
        "--figure2",
        action="store_true",
        help="record eq. 7 at every decoder layer in the full configuration: figure2.json, and figure2.png "
        "with matplotlib (the paper's Figure 2: where Stage 2 will fire on this data)",
    )
    p.add_argument("--tau", type=float, help="Stage 2 threshold for the configurations that use Stage 2")
    p.add_argument("--newlines", choices=["drop", "keep"], help="Stage 1 and the image_newline tokens")
    p.add_argument("--pad-to-square", action="store_true", help="LLaVA-1.5: pad to a square, as LLaVA's evaluation")
    p.add_argument(
        "--min-pixels", type=int, metavar="N", help="Qwen2.5-VL: smallest image area (default: checkpoint's)"
    )
    p.add_argument("--max-pixels", type=int, metavar="N", help="Qwen2.5-VL: largest image area in pixels")
    cli.add_device_flags(p)
    return p


def check_args(args) -> None:
    """Every rule the flags must follow, before anything slow happens."""
    cli.check_number("--limit", args.limit, 1, math.inf)
    cli.check_number("--batch-size", args.batch_size, 1, 4096)
    cli.check_number("--max-new-tokens", args.max_new_tokens, 1, math.inf)
    cli.check_number("--tau", args.tau, 0, math.inf)
    cli.check_number("--min-pixels", args.min_pixels, 1, 2**40)
    cli.check_number("--max-pixels", args.max_pixels, 1, 2**40)
    cli.check_not_empty(args, "data", "images", "model", "out", "score")
    args.benchmarks = benchmark_names(args.benchmark)
    if "jsonl" in args.benchmarks and args.data is None:
        raise UsageError("--benchmark jsonl needs --data FILE")
    if args.score and len(args.benchmarks) != 1:
        raise UsageError("--score scores one benchmark's answers: give one --benchmark")
    args.configs = [name for name in args.configs.split(",") if name]
    if not args.configs or len(set(args.configs)) != len(args.configs):
        raise UsageError("--configs needs distinct configuration names, e.g. full,todre-0.10")
    if args.figure2 and "full" not in args.configs:
        raise UsageError("--figure2 measures the full configuration: add full to --configs")
    args.settings = {name: settings_for(name, args) for name in args.configs}
    args.out = Path(args.out or f"eval-{args.benchmark.replace(',', '-')}")
    for path, flag in ((args.data, "--data"), (args.images, "--images"), (args.score, "--score")):
        if path is not None and not Path(path).exists():
            raise UsageError(f"{flag} {path} does not exist")


def benchmark_names(text: str) -> list[str]:
    names = []
    for name in (n.strip() for n in text.split(",") if n.strip()):
        for one in TABLES.get(name, [name]):
            if one not in BENCHMARKS:
                raise UsageError(f"unknown benchmark {one!r}: choose from {', '.join(BENCHMARKS)}, table1, table4")
            if one not in names:
                names.append(one)
    if not names:
        raise UsageError("--benchmark is empty")
    return names


def settings_for(name: str, args) -> todre.Settings:
    """A configuration name (todre.parse_config, as bench.py) with --tau and --newlines applied
    where the configuration uses that stage."""
    try:
        settings = configs.parse_config(name)
    except ValueError as e:
        raise UsageError(str(e).splitlines()[0] + " (see --help for the names)") from None
    if args.tau is not None and settings.tau > 0:
        settings = replace(settings, tau=args.tau)
    if args.newlines is not None and settings.stage1:
        settings = replace(settings, newlines=args.newlines)
    return settings


# ---------------------------------------------------------------------------------------------
# Processes: one, or torchrun's
# ---------------------------------------------------------------------------------------------


class Shard:
    """This process's part of the run: rank `rank` of `world_size` under torchrun, or the only one."""

    def __init__(self, device_name: str):
        self.rank, self.world_size, self.local_rank = 0, 1, 0
        try:
            self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
            self.rank, self.local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
        except ValueError:
            raise UsageError("WORLD_SIZE, RANK and LOCAL_RANK must be whole numbers (they are torchrun's)") from None
        if not (1 <= self.world_size <= 4096 and 0 <= self.rank < self.world_size and self.local_rank >= 0):
            raise UsageError(f"RANK {self.rank} of WORLD_SIZE {self.world_size} is not a process of a torchrun job")
        if self.world_size > 1:
            import torch.distributed as dist

            gpu = torch.cuda.is_available() and device_name in ("auto", "cuda")
            try:
                dist.init_process_group("nccl" if gpu else "gloo")
            except (RuntimeError, ValueError) as e:
                raise UsageError(
                    f"cannot join the torchrun job ({str(e).splitlines()[0]}): start it with torchrun"
                ) from None

    def device(self, name: str) -> torch.device:
        device = cli.pick_device(name)
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


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def output_folder(args, benchmark: str) -> Path:
    """OUT for one benchmark, OUT/<benchmark> for several."""
    return args.out if len(args.benchmarks) == 1 else args.out / benchmark


def prepare_output(folder: Path) -> None:
    """Made and found writable now, before minutes of model loading."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        files.check_can_write(folder / "results.json")
    except (OSError, files.FileProblem) as e:
        text = os_error_text(e) if isinstance(e, OSError) else str(e)
        raise DataError(f"cannot write the output folder {folder}: {text}") from None


def questions_for(args, bench: Benchmark) -> list[Question]:
    data = Path(args.data) if args.data else None
    images = Path(args.images) if args.images else None
    questions = load_questions(bench, data, images, args.split)
    return limit(questions, args.limit) if args.limit else questions


def evaluate(args) -> list[dict] | None:
    """Answer this process's share of every benchmark's questions; rank 0 then scores them all.
    Returns the results (None on the other ranks)."""
    questions = {name: questions_for(args, BENCHMARKS[name]) for name in args.benchmarks}
    shard = Shard(args.device)
    locks = []
    try:
        if shard.rank == 0:
            for name in args.benchmarks:
                folder = output_folder(args, name)
                prepare_output(folder)
                locks.append(FolderLock(folder))  # first: --overwrite must not delete a running evaluation's answers
                for config in args.configs if args.overwrite else []:
                    if (folder / config).is_dir():
                        shutil.rmtree(folder / config)
        shard.barrier()  # nothing is written before rank 0 holds the folders
        device = shard.device(args.device)
        directory = resolve_checkpoint(args.model)
        model, tokenizer = load(str(directory), device, args.dtype)  # auto: model.auto_dtype
        set_pixel_budget(model, args.min_pixels, args.max_pixels)
        identity = checkpoint_identity(directory)
        results = []
        for name in args.benchmarks:
            bench, folder = BENCHMARKS[name], output_folder(args, name)
            job = make_job(args, bench, folder, model, tokenizer, identity, device, shard)
            skipped = answer_all(model, tokenizer, questions[name], job, shard)
            shard.barrier()  # every rank's answers are on disk
            if shard.rank == 0:
                merged = {config: Predictions(folder / config).records for config in args.configs}
                results.append(
                    score(args, bench, questions[name], merged, skipped, folder, model, args.model, shard.world_size)
                )
        if shard.rank != 0:
            return None
        write_tables(args, results)
        return results
    finally:
        for lock in locks:
            lock.release()
        shard.finish()


def run_split(args, bench: Benchmark) -> str | None:
    """The split this run answers: --split, or the benchmark's default for the data given."""
    if not bench.splits:
        return None
    return args.split or bench.default_split(Path(args.data) if args.data else None)


def make_job(args, bench, folder, model, tokenizer, identity, device, shard) -> Job:
    max_new_tokens = args.max_new_tokens or bench.max_new_tokens
    predictions = {}
    for config, settings in args.settings.items():
        run = {
            "benchmark": bench.name,
            "split": run_split(args, bench),
            "prompt": bench.describe_prompt(),
            "max_new_tokens": max_new_tokens,
            "pad_to_square": args.pad_to_square,
            "figure2": args.figure2 and config == "full",
        }
        if isinstance(model, QwenVL):  # the image sizes its answers were made at
            run["pixels"] = [model.config.min_pixels, model.config.max_pixels]
        expected = fingerprint(identity, model, tokenizer, settings, **run)
        check_fingerprint_everywhere(folder / config, expected, shard, args.adopt)
        predictions[config] = Predictions(folder / config, shard.rank, shard.world_size)

    def reset_peak():
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    return Job(
        configs=args.settings,
        predictions=predictions,
        max_new_tokens=max_new_tokens,
        clock=lambda: cli.now(device),
        peak_memory_mb=lambda: cli.peak_memory_mb(device),
        reset_peak=reset_peak,
        pad_to_square=args.pad_to_square,
        reuse=not args.no_image_cache,
        figure2=args.figure2,
        skip_bad=args.skip_bad,
        read=lambda answer, question: bench.parse(answer, question, args.parser),
        batch_size=batch_size(args, device),
    )


def batch_size(args, device) -> int:
    """How many questions about one image are answered together: 1 with --no-prefix-cache."""
    if args.no_prefix_cache:
        return 1
    return args.batch_size or (4 if device.type == "cpu" else 8)


def check_fingerprint_everywhere(folder: Path, expected: dict, shard: Shard, adopt: bool) -> None:
    check_fingerprint(folder, expected, write=shard.rank == 0, adopt=adopt)
    shard.barrier()


def answer_all(model, tokenizer, questions: list[Question], job: Job, shard: Shard) -> list[dict]:
    """This process's image groups, answered; returns every rank's skipped questions."""
    from tqdm import tqdm

    missing = {}  # image -> why it cannot be read; each distinct image checked once
    for image in {q.image for q in questions if q.blob is None and q.image is not None}:
        if not os.path.isfile(image):
            missing[image] = "not a regular file" if os.path.exists(image) else "image not found"
    skipped = []
    if missing:
        first = next(q for q in questions if q.image in missing)
        if not job.skip_bad:
            more = f" (and {len(missing) - 1} more images; --skip-bad skips them)" if len(missing) > 1 else ""
            folder = Path(first.image).parent
            if not folder.is_dir():  # the whole folder is missing: say where the images go
                more += f"; the folder {folder} does not exist"
            raise DataError(f"{first.source}: {missing[first.image]}: {first.image}{more}", "--images DIR")
        skipped = [
            {"question": q.source, "reason": f"{missing[q.image]}: {q.image}"} for q in questions if q.image in missing
        ]
        questions = [q for q in questions if q.image not in missing]
    groups = todo_groups(questions, job.predictions, shard.rank, shard.world_size)
    answerer = Answerer(model, tokenizer, job)
    total = sum(len(g) for g in groups)
    with tqdm(total=total, desc="questions", unit="q", file=sys.stderr, disable=not total or shard.rank != 0) as bar:
        for group in groups:
            answerer.group(group)
            bar.update(len(group))
    return shard.gather(skipped + answerer.skipped)


# ---------------------------------------------------------------------------------------------
# Scoring, from the stored answers
# ---------------------------------------------------------------------------------------------


def scored_records(bench: Benchmark, questions: list[Question], records: list[dict], parser: str) -> list[dict]:
    """Every question of the run with its stored answer, in the benchmark's order, read by the
    benchmark's parser; labels come from the data, never from the stored record. A question
    without an answer gets the empty answer, marked `missing`, which every scorer counts wrong
    (as LLaVA's scripts count a question their answer file lacks)."""
    answered = {(r["category"], r["question_id"]): r for r in records}
    out = []
    for q in questions:
        r = answered.get(q.key)
        if r is None:
            r = {
                "question_id": q.question_id,
                "category": q.category,
                "question": q.text,
                "answer": "",
                "missing": True,
            }
        out.append(
            {
                **r,
                **q.extra,
                "category": q.category,
                "image": q.image,
                "label": q.label,
                "answers": q.answers,
                "choices": q.choices,
                "source_id": q.source_id,
                "pred": bench.parse(r["answer"], q, parser),
            }
        )
    return out


def summary(records: list[dict], metrics: dict, incomplete: str | None) -> dict:
    """One configuration's row of results.json: the score over every question (missing answers
    counted wrong), how many were answered, and what the answered ones cost. Time fields are None
    where nothing was timed (--score)."""
    answered = [r for r in records if not r.get("missing")]
    n = len(answered)
    timed = any("seconds" in r for r in answered)
    seconds = sum(r.get("seconds", 0.0) for r in answered) if timed else None
    measured = [r["seconds_alone"] for r in answered if r.get("seconds_alone") is not None]
    alone = sum(measured) if timed else None
    return {
        "samples": n,
        "total": len(records),
        "missing": len(records) - n,
        "partial": n < len(records),  # the score counts the missing answers wrong
        "incomplete": incomplete,  # why there is no score although answers are there
        "score": metrics.get("column"),
        "samples_per_s": ratio(n, seconds) if timed else None,  # this run's time per answer, per process
        "samples_per_s_alone": ratio(len(measured), alone) if timed else None,  # one at a time: the paper's
        "seconds_alone_measured": f"{len(measured)} of {n}",  # batched runs time a sample of answers alone
        # every answer's cost alone: measured, or the sample's mean times n (batched runs)
        "seconds_alone_all": (alone if len(measured) == n else ratio(alone, len(measured)) * n) if timed else None,
        "seconds": seconds,
        "seconds_alone": alone,
        "mean_new_tokens": ratio(sum(r.get("new_tokens", 0) for r in answered), n),
        "mean_visual_tokens": ratio(sum(r.get("visual_tokens", 0) for r in answered), n),
        "evict_layer_histogram": dict(
            Counter("none" if r.get("evict_layer") is None else str(r["evict_layer"]) for r in answered)
        ),
        "mean_prefill_tflops": ratio(sum(r.get("prefill_tflops", 0.0) for r in answered), n),
        "peak_memory_mb": max((r.get("peak_memory_mb", 0.0) for r in answered), default=0.0),
        "unparseable": sum(r["pred"] in ("other", "FAILED", None) for r in answered),
        "empty_answers": sum(not r["answer"].strip() for r in answered),
        "metrics": metrics,
    }


def incomplete(bench: Benchmark, records: list[dict]) -> str | None:
    """Why a benchmark whose metric is defined on complete data only (POPE: the mean over its three
    categories) gets no score: how many answers each category lacks."""
    missing = Counter(r["category"] for r in records if r.get("missing"))
    if not bench.complete_only or not missing:
        return None
    counts = ", ".join(f"{category} {n}" for category, n in sorted(missing.items()))
    return f"{sum(missing.values())} of {len(records)} answers missing ({counts}): {bench.name}'s score needs them all"


def relative(metrics, full):
    """`metrics` divided by the full configuration's, field by field; None where full is 0 or missing."""
    if isinstance(metrics, dict):
        return {k: relative(v, full.get(k) if isinstance(full, dict) else None) for k, v in metrics.items()}
    if isinstance(metrics, (int, float)) and not isinstance(metrics, bool):
        return metrics / full if isinstance(full, (int, float)) and full else None
    return None


def llava_answer(bench: Benchmark, record: dict, model_id: str) -> dict:
    """One line of the answers file LLaVA's scripts write, so that LLaVA's own converters and
    scorers read ours: the benchmark's fields, then LLaVA's bookkeeping."""
    answer_id = hashlib.sha1(f"{record['category']}/{record['question_id']}".encode()).hexdigest()[:22]
    return {**bench.llava_answer(record), "answer_id": answer_id, "model_id": model_id, "metadata": {}}


def score(args, bench, questions, stored: dict[str, list[dict]], skipped, folder: Path, model, model_name, world_size):
    """results.json, answers.jsonl and the submission files from the stored answers (by
    configuration) to this run's questions. model_name: the model that answered (None: unknown)."""
    rows, data = {}, Path(args.data) if args.data else None
    split = run_split(args, bench)
    for config, answers in stored.items():
        records = scored_records(bench, questions, answers, args.parser)
        why_not = incomplete(bench, records)
        metrics = bench.metrics(records) if answers and not why_not else {}
        rows[config] = summary(records, metrics, why_not)
        answered = [r for r in records if not r.get("missing")]
        model_id = f"{Path(model_name).name}-{config}" if model_name else config
        write_text(
            folder / config / "answers.jsonl", "".join(json_line(llava_answer(bench, r, model_id)) for r in answered)
        )
        for name, content in bench.submission(answered, subfolder(data, bench.folder) if data else None, split).items():
            write_json(folder / config / name, content)
        if args.figure2 and config == "full" and model is not None:
            write_figure2(records, model, folder)
    full = rows.get("full", {}).get("metrics")
    for row in rows.values():
        row["relative"] = relative(row["metrics"], full or {})
    result = {
        "benchmark": bench.name,
        "column": bench.column,
        "split": split,
        "model": model_name,
        "world_size": world_size,
        "parser": args.parser,
        "configs": rows,
        "skipped": sorted(skipped, key=lambda s: s["question"]),
    }
    write_json(folder / "results.json", result)
    return result


def json_line(value) -> str:
    return json.dumps(value, ensure_ascii=False) + "\n"


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    files.write_atomic(path, text)


def write_tables(args, results: list[dict]) -> dict:
    """OUT/table.md and table.json: the paper's layout over the benchmarks of this run."""
    columns = [r["column"] for r in results]
    scores, seconds, partial = {}, {}, {}
    for r in results:
        for config, row in r["configs"].items():
            scores.setdefault(config, {})[r["column"]] = row["score"]
            if row["partial"]:
                partial.setdefault(config, {})[r["column"]] = f"{row['samples']}/{row['total']}"
            if row["seconds_alone_all"] is not None:
                seconds[config] = seconds.get(config, 0.0) + row["seconds_alone_all"]
    table = tables.build(scores, columns, seconds or None, partial)
    write_json(args.out / "table.json", table)
    write_text(args.out / "table.md", tables.markdown(table) + "\n")
    return table


def score_file(args) -> list[dict]:
    """--score: a LLaVA-format answers file scored against the benchmark's data, no model. Each
    answer is read as stored (whitespace included), as the reference scorers read it; the results
    name the file's own model_id, and everything is written inside --out, never over the input."""
    bench = BENCHMARKS[args.benchmarks[0]]
    questions = questions_for(args, bench)
    waiting = {}
    for q in questions:
        waiting.setdefault(str(q.source_id), []).append(q)
    records, model_ids, path = [], set(), Path(args.score)
    for number, line in json_lines(path):
        where = f"{path}:{number}"
        if "question_id" not in line or not isinstance(line.get("text"), str):
            raise DataError(f"{where}: an answer needs question_id and text (LLaVA's answers format)")
        pending = waiting.get(str(line["question_id"]))
        if not pending:
            raise DataError(
                f"{where}: question_id {line['question_id']!r} is not a question of {bench.name} (or is answered twice)"
            )
        q = pending.pop(0)  # MME's two questions share an id: LLaVA writes them in file order
        records.append(
            {"question_id": q.question_id, "category": q.category, "question": q.text, "answer": line["text"]}
        )
        if isinstance(line.get("model_id"), str):
            model_ids.add(line["model_id"])
    config = path.stem  # the configuration the file holds, named after it
    folder = args.out
    outputs = [folder / "results.json", folder / "table.json", folder / "table.md", folder / config / "answers.jsonl"]
    outputs += [folder / config / name for name in bench.submission([], None, "test")]
    if any(out.exists() and out.samefile(path) for out in outputs):
        raise UsageError(f"--score {path} lies where the results go: give another --out")
    prepare_output(folder)
    args.figure2 = False
    model_name = model_ids.pop() if len(model_ids) == 1 else None
    result = score(args, bench, questions, {config: records}, [], folder, None, model_name, 1)
    write_tables(args, [result])
    return [result]


# ---------------------------------------------------------------------------------------------
# Figure 2 and the printed table
# ---------------------------------------------------------------------------------------------


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


def report(result: dict) -> str:
    """One benchmark's rows: its score (the paper's column; a partial one marked), vs full, what the
    answers cost (where this run measured it), and warnings."""
    timed = any(row["seconds"] is not None for row in result["configs"].values())
    cost = ["new tokens", "samples/s", "samples/s alone", "prefill TFLOPs"] if timed else []
    header = ["config", "answered", "visual tokens", result["column"], "vs full", *cost]
    lines = [
        f"{result['benchmark']}" + (f" ({result['split']})" if result["split"] else ""),
        "| " + " | ".join(header) + " |",
        "|---" * len(header) + "|",
    ]
    full = result["configs"].get("full", {}).get("score")
    for name, row in result["configs"].items():
        score = row["score"]
        vs = f"{100 * score / full:.1f}%" if score is not None and full else "-"
        shown = "-" if score is None else f"{score:.2f}" + (" (partial)" if row["partial"] else "")
        cells = [name, f"{row['samples']}/{row['total']}", f"{row['mean_visual_tokens']:.0f}", shown, vs]
        if timed:
            cells += [
                f"{row['mean_new_tokens']:.1f}",
                f"{row['samples_per_s']:.2f}" if row["samples_per_s"] is not None else "-",
                f"{row['samples_per_s_alone']:.2f}" if row["samples_per_s_alone"] is not None else "-",
                f"{row['mean_prefill_tflops']:.3f}",
            ]
        lines.append("| " + " | ".join(cells) + " |")
    for name, row in result["configs"].items():
        if row["incomplete"]:
            lines.append(f"{name}: no score: {row['incomplete']}")
            continue
        notes = [f"{row[k]} {k.replace('_', ' ')}" for k in ("missing", "unparseable", "empty_answers") if row[k]]
        if notes:
            lines.append(f"{name}: " + ", ".join(notes) + " (counted wrong)")
    if result["skipped"]:
        lines.append(f"{len(result['skipped'])} question(s) skipped (listed in results.json)")
    if any(row["score"] is None and row["samples"] and not row["incomplete"] for row in result["configs"].values()):
        lines.append("no reference answers in this split: upload each configuration's submission file to EvalAI")
    return "\n".join(lines)


def main(argv=None) -> int:
    """User and data errors as one stderr line and exit code 2, Ctrl-C as a quiet 130 (the
    answers written so far stay; the same command continues)."""

    def work():
        args = parse_args(argv)
        try:
            results = score_file(args) if args.score else evaluate(args)
        except OSError as e:  # the output folder: full disk, permissions
            where = f" ({e.filename})" if e.filename else ""
            raise cli.OutputError(f"cannot write the results: {os_error_text(e)}{where}") from None
        if results is not None:  # rank 0, or the only process
            print("\n\n".join(report(r) for r in results))
            if len(results) > 1:
                print("\n" + (args.out / "table.md").read_text())

    return cli.exit_code(work, (DataError, MediaError, CheckpointError, InputError), explain)


def explain(e: Exception) -> str | None:
    """The error line: the library says what is wrong, this adds the option to change. Every rank
    sees the same bad command line, so only rank 0 says so; data errors name their rank."""
    if isinstance(e, ContextError):  # tied to its question by the runner
        return f"{e} (--max-new-tokens; --skip-bad skips such questions)"
    rank = os.environ.get("RANK", "0")
    if rank != "0" and isinstance(e, UsageError):
        return None
    flag = f" ({e.flag})" if getattr(e, "flag", None) else ""
    return f"{'' if rank == '0' else f'rank {rank}: '}{e}{flag}"


if __name__ == "__main__":
    cli.run(main, CTRL_C_HANDLED)
