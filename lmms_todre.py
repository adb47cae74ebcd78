"""ToDRE inside lmms-eval (EvolvingLMMs-Lab/lmms-eval 0.7.x): every lmms-eval task, answered by this
project's model under any pruning configuration, scored by lmms-eval's own scorers.

    python lmms_todre.py --model todre \
        --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,config=todre-0.10 \
        --tasks pope,mme,videomme --batch_size 1 --log_samples --output_path logs/todre-0.10
    accelerate launch --num_processes 8 lmms_todre.py --model todre ...   # as lmms-eval's own launch
    python lmms_todre.py table2 full=logs/full todre-0.10=logs/todre-0.10 --out table2

This file registers the `todre` model with lmms-eval and hands every other argument to lmms-eval's
own command line. lmms-eval is optional (`pip install -r requirements-lmms.txt`); nothing else in
the project imports it. `table2` turns lmms-eval result folders into the paper's Table 2.
"""

import cli

CTRL_C_HANDLED = cli.quiet_ctrl_c(__name__)  # before the slow imports (torch, lmms-eval)

import hashlib
import math
import os
import sys
from pathlib import Path

import torch

import files
from checkpoint import DEFAULT_MODEL, CheckpointError
from cli import UsageError
from evaluation import batched, configs, tables
from media import MediaError, open_image_bytes, open_video
from model import InputError, check_generation, check_video_budget, generate, load, placement, prompt_ids
from prompt import PromptFormat
from qwen import QwenVL, set_pixel_budget

try:
    from lmms_eval.api.model import lmms as LMMsModel
except ImportError:  # lmms-eval is optional: `main` says how to install it
    LMMsModel = object

TABLE2 = {  # the paper's Table 2 columns: lmms-eval task -> its score in the results file
    "videomme": ("VideoMME", "videomme_perception_score"),
    "egoschema_subset": ("Egoschema", "score"),
    "mlvu_dev": ("MLVU", "mlvu_percetion_score"),
    "longvideobench_val_v": ("LongVideoBench", "lvb_acc"),
}


# lmms-eval's own qwen2_5_vl model: its image size range (model args min_pixels, max_pixels).
QWEN_MIN_PIXELS, QWEN_MAX_PIXELS = 256 * 28 * 28, 1605632


def cut(text: str, request, qwen: bool = False) -> str:
    """The answer up to the first of the request's `until` strings, stripped as lmms-eval's llava does;
    for Qwen2.5-VL as lmms-eval's qwen2_5_vl does: "\n\n" is no stop (it would cut answers short)
    and nothing is stripped."""
    until = dict(request.args[1]).get("until") or []
    for stop in [until] if isinstance(until, str) else list(until):
        if stop and stop in text and not (qwen and stop == "\n\n"):
            text = text[: text.index(stop)]
    return text if qwen else text.strip()


class ToDRE(LMMsModel):
    """lmms-eval's model interface over this project's LLaVA and ToDRE.

    Model arguments: pretrained (Hub id or directory), config (todre.parse_config's names: full,
    todre-0.10, keep-64, todre-0.10-v2, ...), device, dtype, max_frames (video: one frame a second,
    at most this many; 20, the paper's), video_newlines (grid, the paper's, or none), pad_to_square
    (LLaVA-1.5), conv (vicuna, mistral, chatml or llama3: the built-in format instead of the
    checkpoint's own), min_pixels and max_pixels (Qwen2.5-VL's image size range; lmms-eval's
    qwen2_5_vl defaults, 200704 and 1605632). On Qwen2.5-VL the requests are read as lmms-eval's
    qwen2_5_vl reads them: "<image>" removed from the context, the images before it.
    """

    def __init__(
        self,
        pretrained: str = DEFAULT_MODEL,
        config: str = "todre-0.10",
        device: str = "auto",
        dtype: str = "auto",
        max_frames: int = 20,
        video_newlines: str | None = None,
        pad_to_square: bool = False,
        conv: str | None = None,
        batch_size: int = 1,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        **unknown,
    ):
        super().__init__()
        if unknown:
            raise UsageError(f"unknown model argument(s) {', '.join(sorted(unknown))} for --model todre")
        if not str(batch_size).isdigit() or int(batch_size) < 1:
            raise UsageError(f"--batch_size must be a whole number of requests answered together, not {batch_size}")
        try:
            self.settings = configs.parse_config(str(config))
        except ValueError as e:
            raise UsageError(f"model argument config: {str(e).splitlines()[0]}") from None
        for name, value, choices in (
            ("device", device, ("auto", "cuda", "mps", "cpu")),
            ("dtype", dtype, ("auto", "float16", "bfloat16", "float32")),
            ("video_newlines", video_newlines, (None, "grid", "none")),
            ("conv", conv, (None, "vicuna", "mistral", "chatml", "llama3")),
            ("pad_to_square", str(pad_to_square).lower(), ("true", "false", "1", "0", "yes", "no")),
        ):
            if value not in choices:
                shown = ", ".join(str(c) for c in choices if c is not None)
                raise UsageError(f"model argument {name} must be one of {shown}, got {value!r}")
        if not str(max_frames).isdigit() or not 1 <= int(max_frames) <= 10_000:
            raise UsageError(f"model argument max_frames must be a whole number from 1 to 10000, got {max_frames!r}")
        for name, value in (("min_pixels", min_pixels), ("max_pixels", max_pixels)):
            if value is not None and (not str(value).isdigit() or int(value) < 1):
                raise UsageError(f"model argument {name} must be a whole number of pixels, got {value!r}")
        if not isinstance(pretrained, str) or not pretrained:
            raise UsageError(f"model argument pretrained must be a Hub id or a directory, got {pretrained!r}")
        self._rank, self._world_size = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        self._device = cli.pick_device(device)
        if self._device.type == "cuda" and self._world_size > 1:  # one GPU per process, as lmms-eval launches
            self._device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
            torch.cuda.set_device(self._device)
        self.model, self.tokenizer = load(pretrained, self._device, dtype)  # auto: model.auto_dtype
        self.qwen = isinstance(self.model, QwenVL)
        if self.qwen:
            low = int(min_pixels) if min_pixels is not None else QWEN_MIN_PIXELS
            high = int(max_pixels) if max_pixels is not None else QWEN_MAX_PIXELS
            set_pixel_budget(self.model, low, high)
        elif min_pixels is not None or max_pixels is not None:
            raise UsageError("model arguments min_pixels and max_pixels apply to Qwen2.5-VL checkpoints")
        if conv is not None:
            self.tokenizer.format = PromptFormat(conv, None, self.tokenizer.format.special_tokens)
        self.max_frames, self.video_newlines = int(max_frames), video_newlines
        self.pad_to_square = str(pad_to_square).lower() in ("1", "true", "yes")
        self.batch_size_per_gpu = self.batch_size = int(batch_size)
        self.visual_tokens: list[dict] = []  # per request: tokens kept and the eviction layer

    @property
    def device(self):
        return self._device

    @property
    def rank(self):
        return self._rank

    @property
    def world_size(self):
        return self._world_size

    # -- requests -------------------------------------------------------------------------------

    def context(self, request) -> str:
        """The request's text. Qwen2.5-VL: without "<image>" (lmms-eval's qwen2_5_vl removes it and
        puts every image first)."""
        return request.args[0].replace("<image>", "") if self.qwen else request.args[0]

    def visuals(self, request) -> tuple[list, bool]:
        """The request's images (PIL) or video (a path), as the task's doc_to_visual gives them."""
        _, _, doc_to_visual, doc_id, task, split = request.args[:6]
        found = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        found = [v for v in (found if isinstance(found, list) else [found]) if v is not None]
        video = bool(found) and all(isinstance(v, str) for v in found)
        return found, video

    def inputs(self, question: str, request):
        """(prompt ids, visual embeddings or None, their placement) for one request, Stage 1
        applied per image (the placement: where the kept tokens sit, for Qwen2.5-VL's M-RoPE)."""
        found, video = self.visuals(request)
        if not found:
            return prompt_ids(self.tokenizer, question).to(self.device), None, None
        if video:  # this project's frame sampling and pooling: 1 fps, at most max_frames, 2x2 pooled
            frames = open_video(found[0], self.max_frames).frames
            check_video_budget(self.model, len(frames), self.video_newlines, self.settings, 1)
            visuals = [self.model.encode_video(frames, self.video_newlines)]
        else:
            images = [v if hasattr(v, "size") else open_image_bytes(v, "an image of the request") for v in found]
            visuals = [self.model.encode_image(image.convert("RGB"), self.pad_to_square) for image in images]
        kept = [self.model.select(visual, self.settings) for visual in visuals]
        embeds = torch.cat([visual.tokens[k] for visual, k in zip(visuals, kept, strict=True)])
        counts = [len(k) for k in kept]
        placeholder = self.tokenizer.placeholder(video)[0]
        inline = placeholder in question  # interleaved tasks put the images where they belong themselves
        if inline and question.count(placeholder) != len(counts):
            raise InputError(
                f"the task's context holds {question.count(placeholder)} {placeholder} placeholders for "
                f"{len(counts)} visual input(s)"
            )
        ids = prompt_ids(self.tokenizer, question, counts if len(counts) > 1 else counts[0], video, inline=inline)
        return ids.to(self.device), embeds, placement(visuals, kept)

    @torch.inference_mode()
    def generate_until(self, requests) -> list[str]:
        """Each request greedily (temperature 0) or sampled, up to its max_new_tokens, cut at the
        first of its `until` strings, stripped as lmms-eval's llava strips its answers. Greedy
        requests about the same image (POPE asks ~18 per COCO image) are answered together, up to
        batch_size at a time, on one shared prefix (evaluation/batched.py): the same answers, the
        image encoded and pruned once."""
        answers: dict[int, str] = {}
        for group in self.same_image_groups(requests):
            texts = self.answer_together(group) if len(group) > 1 and self.batch_size > 1 else None
            for index, request in group:
                answers[index] = self.answer_one(request) if texts is None else cut(texts[index], request, self.qwen)
                self.cache_hook.add_partial("generate_until", request.args[:2], answers[index])
        return [answers[i] for i in range(len(requests))]

    def same_image_groups(self, requests) -> list[list[tuple[int, object]]]:
        """(index, request) grouped by their one image (a digest of its pixels) and max_new_tokens,
        for greedy requests; every other request is a group of its own."""
        groups: dict = {}
        for index, request in enumerate(requests):
            kwargs = dict(request.args[1])
            found, video = self.visuals(request)
            key = ("alone", index)
            if not video and len(found) == 1 and not float(kwargs.get("temperature", 0) or 0):
                image = found[0] if hasattr(found[0], "tobytes") else open_image_bytes(found[0], "an image")
                digest = hashlib.sha256(image.tobytes() + f"{image.mode}{image.size}".encode()).hexdigest()
                key = (digest, int(kwargs.get("max_new_tokens", 1024)))
            groups.setdefault(key, []).append((index, request))
        return list(groups.values())

    def answer_one(self, request) -> str:
        question, gen_kwargs = self.context(request), dict(request.args[1])
        max_new_tokens = int(gen_kwargs.get("max_new_tokens", 1024))
        temperature = float(gen_kwargs.get("temperature", 0) or 0)
        ids, embeds, where = self.inputs(question, request)
        generator = torch.Generator(self.device).manual_seed(0)
        result = generate(
            self.model, ids, embeds, self.settings, max_new_tokens, temperature, generator, placement=where
        )
        self.visual_tokens.append({"visual_tokens": 0 if embeds is None else len(embeds)})
        self.visual_tokens[-1]["evict_layer"] = result.info.evict_layer
        return cut(self.tokenizer.decode(result.token_ids), request, self.qwen)

    def answer_together(self, group) -> dict[int, str] | None:
        """Greedy answers to requests about one image on one shared prefix, by index; None where
        their prompts share none (an image placed inside the context), to be answered one at a time."""
        if any(self.tokenizer.placeholder(False)[0] in request.args[0] for _, request in group):
            return None
        first = group[0][1]
        (image,), _ = self.visuals(first)
        image = image if hasattr(image, "size") else open_image_bytes(image, "an image of the request")
        visual = self.model.encode_image(image.convert("RGB"), self.pad_to_square)
        kept = self.model.select(visual, self.settings)
        prompts = [prompt_ids(self.tokenizer, self.context(request), len(kept)).to(self.device) for _, request in group]
        p = batched.shared_prefix(prompts, self.model.is_visual)
        if p is None:
            return None
        max_new_tokens = int(dict(first.args[1]).get("max_new_tokens", 1024))
        for ids in prompts:
            check_generation(self.model, ids, visual.tokens[kept], max_new_tokens, 0.0)
        where = placement([visual], [kept])
        prefix = batched.prefill_prefix(self.model, prompts[0][:p], visual.tokens[kept], where)
        texts = {}
        for start in range(0, len(group), self.batch_size):
            chunk = prompts[start : start + self.batch_size]
            rows = batched.answer_batch(self.model, chunk, p, prefix, self.settings, max_new_tokens, placement=where)
            for (index, _), row in zip(group[start : start + self.batch_size], rows, strict=True):
                texts[index] = self.tokenizer.decode(row.token_ids)
                self.visual_tokens.append({"visual_tokens": len(kept), "evict_layer": row.info.evict_layer})
        return texts

    @torch.inference_mode()
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """The log-probability of each request's continuation after its context (and image), and
        whether greedy decoding would produce it, with both pruning stages as in generation."""
        results = []
        for request in requests:
            context, target = self.context(request), request.args[1]
            _, _, doc_to_visual, doc_id, task, split = request.args[:6]
            continuation = target if isinstance(target, str) else target(self.task_dict[task][split][doc_id])
            ids, embeds, where = self.inputs(context, request)
            # the continuation as the model would generate it after the opened assistant turn: its own
            # tokens (SentencePiece gives "yes" its leading piece, as after "ASSISTANT:"), no end token
            cont = torch.tensor(self.tokenizer.encode(continuation, add_special_tokens=False).ids, dtype=torch.long)
            if len(cont) == 0:
                raise InputError(f"the continuation {continuation!r} has no tokens")
            full = torch.cat([ids, cont.to(self.device)])
            kv_cache = self.model.new_kv_cache(1)
            logits, _ = self.model.prefill(full, embeds, self.settings, kv_cache, all_logits=True, placement=where)
            # Eviction removes only visual tokens, which come before the text: the continuation is still
            # the last len(cont) rows, each predicted by the row before it.
            rows = logits[0, -len(cont) - 1 : -1]
            logprobs = rows.log_softmax(-1)
            targets = full[len(ids) :]
            total = float(logprobs.gather(-1, targets[:, None]).sum())
            results.append((total, bool((rows.argmax(-1) == targets).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("--model todre answers single-round tasks")


# ---------------------------------------------------------------------------------------------
# Table 2 from lmms-eval's results
# ---------------------------------------------------------------------------------------------


def read_results(path: Path) -> dict:
    """lmms-eval's results by task, from one results file or from every *_results.json under an
    output folder (lmms-eval writes <folder>/<model>/<time>_results.json, one per run): for each
    task, the newest file that has it, so tasks run one at a time all count."""
    if path.is_dir():
        found = sorted(path.rglob("*results*.json"), key=lambda p: p.stat().st_mtime)
        if not found:
            raise UsageError(f"{path} holds no lmms-eval results file (*results*.json)")
    elif path.is_file():
        found = [path]
    else:
        raise UsageError(f"{path} does not exist")
    merged = {}
    for file in found:  # oldest first: a newer run of a task replaces an older one
        merged.update(results_of(file))
    return merged


def results_of(path: Path) -> dict:
    """The `results` object of one lmms-eval results file, each task's row an object."""
    try:
        value = files.read_json(path, 256 << 20)
    except files.FileProblem as e:
        raise UsageError(str(e)) from None
    results = value.get("results") if isinstance(value, dict) else None
    if not isinstance(results, dict) or not all(isinstance(row, dict) for row in results.values()):
        raise UsageError(f"{path} has no 'results' object of tasks: not an lmms-eval results file")
    return results


def score_of(results: dict, task: str, metric: str) -> float | None:
    """A task's score as lmms-eval reports it ("<metric>,none"), None when the run lacks the task."""
    row = results.get(task) or {}
    value = row.get(f"{metric},none", row.get(metric))
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return float(value) if is_number and math.isfinite(value) else None


def table2(argv: list[str]) -> int:
    """`table2 CONFIG=RESULTS ... [--out DIR]`: the paper's Table 2 as table.md and table.json; a
    task a configuration's results lack is "-" and named."""
    out = Path("table2")
    if "--out" in argv:
        i = argv.index("--out")
        if i + 1 >= len(argv):
            raise UsageError("--out needs a folder")
        out, argv = Path(argv[i + 1]), argv[:i] + argv[i + 2 :]
    if not argv or any("=" not in a for a in argv):
        raise UsageError("table2 takes CONFIG=RESULTS pairs, e.g. full=logs/full todre-0.10=logs/todre-0.10")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file: give a folder for table.md and table.json")
    scores, missing = {}, {}
    for pair in argv:
        config, path = pair.split("=", 1)
        results = read_results(Path(path))
        scores[config] = {column: score_of(results, task, metric) for task, (column, metric) in TABLE2.items()}
        missing[config] = [task for task, (column, _) in TABLE2.items() if scores[config][column] is None]
    table = tables.build(scores, [column for column, _ in TABLE2.values()])
    table["missing"] = {config: tasks for config, tasks in missing.items() if tasks}
    markdown = tables.markdown(table, {c: 3 for c, _ in TABLE2.values()})
    try:
        out.mkdir(parents=True, exist_ok=True)
        files.write_json(out / "table.json", table)
        files.write_atomic(out / "table.md", markdown + "\n")
    except OSError as e:
        raise cli.OutputError(f"cannot write {out}: {files.os_error_text(e)}") from None
    print(markdown)
    for config, tasks in table["missing"].items():
        print(f"{config}: no result for {', '.join(tasks)} (its Average covers the other columns)", file=sys.stderr)
    return 0


def register() -> None:
    """Make `--model todre` known to lmms-eval's model registry, and `--model llava_vid` this model
    too (in this process only): lmms-eval picks a task's prompt by the model's name, and the
    paper's Table 2 ran with llava_vid's (VideoMME's "The best answer is:")."""
    from lmms_eval.models import MODEL_REGISTRY_V2
    from lmms_eval.models.registry_v2 import ModelManifest

    for name in ("todre", "llava_vid"):
        manifest = ModelManifest(model_id=name, simple_class_path="lmms_todre.ToDRE")
        MODEL_REGISTRY_V2.register_manifest(manifest, overwrite=True)


class Failed(BaseException):
    """An error inside lmms-eval's run, carried past its `except Exception` (which prints a
    traceback and exits 0) to `main`, which prints it as one line."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


class LmmsEvalError(Exception):
    """lmms-eval stopped with an error of its own (a task it cannot load, a broken dataset)."""


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv

    def work():
        if argv[:1] == ["table2"]:
            return table2(argv[1:])
        if LMMsModel is object:
            raise UsageError("this needs lmms-eval: pip install -r requirements-lmms.txt")
        sys.path.insert(0, str(Path(__file__).parent))  # lmms-eval imports the model as lmms_todre.ToDRE
        register()
        import lmms_eval.__main__ as lmms_main

        def run_single(args, evaluate_single=lmms_main.cli_evaluate_single):
            try:
                return evaluate_single(args)
            except Exception as e:
                raise Failed(e) from None

        lmms_main.cli_evaluate_single = run_single
        sys.argv = [sys.argv[0], *argv]
        try:
            lmms_main.cli_evaluate()
        except Failed as failed:
            error = failed.error
            if isinstance(error, USER_ERRORS):
                raise error from None
            raise LmmsEvalError(f"lmms-eval stopped: {type(error).__name__}: {str(error)[:300]}") from None

    return cli.exit_code(work, (*USER_ERRORS, LmmsEvalError))


USER_ERRORS = (UsageError, CheckpointError, MediaError, InputError, files.FileProblem)


if __name__ == "__main__":
    cli.run(main, CTRL_C_HANDLED)
