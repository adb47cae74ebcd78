"""Prompts in each checkpoint's own conversation format, tokenized the way LLaVA was trained.

Every LLaVA family was trained with its own format: Vicuna with LLaVA's system prompt, Mistral's
[INST] ... [/INST], ChatML for the 34B (Yi), Llama 3's headers. A checkpoint's chat template
(`chat_template.jinja`, `chat_template.json`, or `tokenizer_config.json`'s `chat_template`) is
rendered with jinja2 in a sandbox, as transformers' apply_chat_template does; a checkpoint
without one falls back on the built-in table below. Vicuna always gets LLaVA's literal system
prompt, as LLaVA's evaluation (and so every published number) used it.

Tokenization: LLaVA's training code tokenized the text on each side of `<image>` separately
(`tokenizer_image_token`), so SentencePiece families get their dummy `▁` prefix again after the
image (ids 29871, 13 for "\n" in Llama-2 vocabularies). `encode` splits the same way, whatever
the tokenizer.json's own setting; transformers 5 with `legacy: false` would drop that `▁`.
"""

import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import files
from files import FileProblem, read_file

# LLaVA's Vicuna v1 system prompt: conv_vicuna_v1 in LLaVA's conversation.py, which every evaluation
# script passes (--conv-mode vicuna_v1) and LLaVA-1.5/NeXT were trained with. (Its conv_llava_v1 says
# "curious human ... the human's questions"; the scripts' defaults name it, but no published run used it.)
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLAMA3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that "
    "the user provides, and assist the user with a variety of tasks using natural language."
)
# The built-in formats, for checkpoints that ship no chat template: {system} and {user} are filled
# in, the user turn being "<image>\n" + the question (just the question without an image).
BUILT_IN = {
    "vicuna": "{system} USER: {user} ASSISTANT:",
    "mistral": "[INST] {user} [/INST]",
    "chatml": "<|im_start|>system\n{system}<|im_end|><|im_start|>user\n{user}<|im_end|><|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|><|start_header_id|>user<|end_header_id|>"
    "\n\n{user}<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}
SYSTEMS = {"vicuna": VICUNA_SYSTEM, "chatml": "Answer the questions.", "llama3": LLAMA3_SYSTEM}
END_OF_TURN = {"chatml": "<|im_end|>", "llama3": "<|eot_id|>"}  # tokens that end the assistant's turn


class PromptError(ValueError):
    """The prompt cannot be built (a broken chat template, text that is not UTF-8)."""


@dataclass
class PromptFormat:
    """How one checkpoint turns a question into text."""

    family: str  # vicuna, mistral, chatml, llama3
    chat_template: str | None = None  # the checkpoint's jinja template; None: the built-in one
    special_tokens: dict = field(default_factory=dict)  # bos_token, eos_token... for the template
    source: str = "the built-in format"  # the file the template came from, for messages

    @property
    def name(self) -> str:
        """What --stats prints."""
        if self.family == "vicuna":
            return "vicuna (LLaVA's system prompt)"
        return f"{self.family} ({'chat template' if self.chat_template else 'built-in'})"

    def render(self, question: str, placeholder: str | None, images: int = 1) -> str:
        """The conversation as text: one user turn (the placeholder, a newline, the question) and
        the assistant's turn opened. placeholder None: a text-only question. Several images: their
        placeholders separated by spaces, as lmms-eval's llava writes them ("<image> <image>\\n")."""
        user = question if placeholder is None else f"{' '.join([placeholder] * images)}\n{question}"
        if self.family == "vicuna" or not self.chat_template:
            system = SYSTEMS.get(self.family, "")
            return BUILT_IN[self.family].format(system=system, user=user)
        kind = "video" if placeholder and "video" in placeholder else "image"  # <video>, <|video_pad|>
        media = [{"type": kind}] * images if placeholder else []
        content = media + [{"type": "text", "text": question}]
        return render_template(
            self.chat_template, [{"role": "user", "content": content}], self.special_tokens, self.source
        )


# Bounds on rendering a checkpoint's template, which is code from the checkpoint: what any chat
# template needs is tiny next to these, and a hostile one ('x' * 10**10, 7 ** 10**10, nested loops
# over huge ranges) fails in a moment instead of hanging or eating the memory.
MAX_RENDERED_CHARS = 1 << 20
MAX_LOOP_STEPS = 100_000  # for-loop and range() steps over one rendering
MAX_REPEAT = 1 << 16  # str/list * n
MAX_POWER_BITS = 256  # a ** b results


@functools.cache
def bounded_environment():
    """jinja2's immutable sandbox as transformers' apply_chat_template sets it up (trim_blocks,
    lstrip_blocks, loop controls, a no-op {% generation %} block, raise_exception, an unescaped
    tojson), with the bounds above. Built once: compiling templates is the costly part."""
    try:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise PromptError("this checkpoint's chat template needs jinja2: pip install jinja2") from None

    class Generation(Extension):  # transformers marks the assistant's text with {% generation %}
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    class Bounded(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**", "%"})
        loop_steps = 0  # for-loop and range() steps in the rendering under way; render_template resets it

        def _generate(self, source, name, filename, defer_init=False):
            """The template compiled to Python, every for-loop's iterable passed through bounded_iter
            (jinja2 iterates plain Python objects, out of the sandbox's sight)."""
            code = super()._generate(source, name, filename, defer_init=defer_init)
            return FOR_LOOP.sub(r"\1for \2 in environment.bounded_iter(\3):", code)

        def bounded_iter(self, iterable):
            for value in iterable:
                self.loop_steps += 1
                if self.loop_steps > MAX_LOOP_STEPS:
                    raise jinja2.exceptions.SecurityError(f"loops more than {MAX_LOOP_STEPS} times")
                yield value

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja2's own signature)
            """Every call in a template: str methods that build long strings are checked first."""
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)  # str.format comes wrapped
            if isinstance(owner, str):
                check_string_method(owner, getattr(__obj, "__name__", ""), args)
            return super().call(__context, __obj, *args, **kwargs)

        def call_binop(self, context, operator, left, right):
            if operator == "*" and any(isinstance(x, (str, list, tuple)) for x in (left, right)):
                count = right if isinstance(left, (str, list, tuple)) else left
                if isinstance(count, int) and count > MAX_REPEAT:
                    raise jinja2.exceptions.SecurityError(f"repeats something {count} times")
            if operator == "%" and isinstance(left, str):
                check_string_method(left, "%", (right,))
            if operator == "**" and isinstance(left, int) and isinstance(right, int):
                if right > 0 and abs(left) > 1 and right * max(1, abs(left).bit_length()) > MAX_POWER_BITS:
                    raise jinja2.exceptions.SecurityError(f"computes {left} ** {right}")
            return super().call_binop(context, operator, left, right)

    environment = Bounded(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, jinja2.ext.loopcontrols])

    def bounded_range(*args):
        for value in range(*args):
            environment.loop_steps += 1
            if environment.loop_steps > MAX_LOOP_STEPS:
                raise jinja2.exceptions.SecurityError(f"loops more than {MAX_LOOP_STEPS} times")
            yield value

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    environment.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    environment.globals.update(raise_exception=raise_exception, range=bounded_range)
    for name, method in (("center", "center"), ("replace", "replace"), ("indent", None), ("format", "format")):
        environment.filters[name] = bounded_filter(environment.filters[name], method or name)
    environment.filters["join"] = bounded_filter(environment.filters["join"], "join")
    return environment


FOR_LOOP = re.compile(r"^(\s*)for (.+?) in (.*):$", re.MULTILINE)
WIDTH = re.compile(r"\d+")  # the widths and precisions of a format string: %999999999s, {:>999999999}
NESTED_WIDTH = re.compile(r"%[^a-z%]*\*|\{[^}]*\{")


def check_string_method(text: str, name: str, args) -> None:
    """A jinja2 SecurityError before a str method or string filter builds more than
    MAX_RENDERED_CHARS characters: padding to a width, replacing, joining, formatting."""
    import jinja2

    def refuse(size):
        if size > MAX_RENDERED_CHARS:
            raise jinja2.exceptions.SecurityError(f"{name} would build {size} characters")

    if name in ("center", "ljust", "rjust", "zfill", "indent", "expandtabs") and args:
        width = args[0] if isinstance(args[0], int) else 0
        refuse(width * (text.count("\n") + 1 if name in ("indent", "expandtabs") else 1))
    elif name == "replace" and len(args) >= 2 and all(isinstance(a, str) for a in args[:2]) and args[0]:
        refuse(len(text) + text.count(args[0]) * max(0, len(args[1]) - len(args[0])))
    elif name == "replace" and len(args) >= 2 and isinstance(args[1], str):  # "" matches between every character
        refuse(len(text) + (len(text) + 1) * len(args[1]))
    elif name in ("format", "format_map", "%"):  # widths in the format, or passed in as numbers
        values = args[0] if name == "%" and isinstance(args[0], (tuple, list)) else args
        values = list(values.values()) if isinstance(values, dict) else list(values)
        numbers = [int(w) for w in WIDTH.findall(text)]
        if NESTED_WIDTH.search(text):  # '%*s' % (n, x), '{0:{1}}'.format(x, n): a width passed as a number
            numbers += [v for v in values if isinstance(v, int)]
        refuse(max(numbers, default=0))
    elif name == "join" and args:
        items = list(args[0]) if not isinstance(args[0], str) else list(args[0])
        refuse(sum(len(str(i)) for i in items[: MAX_RENDERED_CHARS + 1]) + len(text) * max(0, len(items) - 1))


def bounded_filter(original, name: str):
    """A string-building jinja2 filter, its result's size checked before it is built."""
    passes_context = hasattr(original, "jinja_pass_arg")  # replace and join take jinja2's eval context first

    def bounded(*args, **kwargs):
        value, rest = (args[1], args[2:]) if passes_context else (args[0], args[1:])
        if name == "join":  # value|join(separator)
            value = list(value)
            separator = rest[0] if rest and isinstance(rest[0], str) else kwargs.get("d", "")
            check_string_method(separator, "join", (value,))
            args = (args[0], value, *rest) if passes_context else (value, *rest)
        elif name == "indent":
            check_string_method(str(value), "indent", (rest[0] if rest else kwargs.get("width", 4),))
        elif isinstance(value, str):
            check_string_method(value, name, rest)
        return original(*args, **kwargs)

    if passes_context:
        bounded.jinja_pass_arg = original.jinja_pass_arg
    return bounded


@functools.lru_cache(maxsize=16)
def compiled(template: str):
    """A template compiled once, rendered for every prompt."""
    return bounded_environment().from_string(template)


def render_template(template: str, messages: list, special_tokens: dict, source: str = "the chat template") -> str:
    """A chat template rendered as transformers' apply_chat_template(add_generation_prompt=True)
    renders it (bounded_environment), and every way it can fail a PromptError naming `source`."""
    environment = bounded_environment()
    import jinja2

    try:
        chunks, size = [], 0
        environment.loop_steps = 0
        stream = compiled(template).generate(messages=messages, add_generation_prompt=True, **special_tokens)
        for chunk in stream:
            size += len(chunk)
            if size > MAX_RENDERED_CHARS:
                raise jinja2.exceptions.SecurityError(f"renders more than {MAX_RENDERED_CHARS} characters")
            chunks.append(chunk)
        return "".join(chunks)
    except Exception as e:  # the template is code: any error it raises (1/0, recursion, a type error) is its own
        raise PromptError(f"{source} cannot be rendered ({type(e).__name__}: {str(e)[:200]})") from None


def load_format(directory: Path, text_model_type: str, vocab: dict) -> PromptFormat:
    """The checkpoint's conversation format: its chat template (chat_template.jinja, .json, then
    tokenizer_config.json) classified by the markers its text holds (it is rendered only when a
    prompt is made), or, without one, the family its tokenizer and text model say (ChatML and
    Llama 3 by their special tokens, Mistral by its model type, else Vicuna)."""
    tokenizer_config = read_json_object(directory / "tokenizer_config.json")
    template, source = None, None
    for path, key in (
        (directory / "chat_template.jinja", None),  # transformers 5 saves it alone, older ones in JSON
        (directory / "chat_template.json", "chat_template"),
        (directory / "tokenizer_config.json", "chat_template"),
    ):
        if key is None:
            try:
                template = read_optional(path).decode("utf-8") or None
            except UnicodeDecodeError as e:
                raise PromptError(f"{path} is not UTF-8 text ({e.reason})") from None
        else:
            template = (tokenizer_config if path.name == "tokenizer_config.json" else read_json_object(path)).get(key)
        if template:
            source = f"the chat template in {path}"
            break
    if isinstance(template, list):  # several named templates: the default one
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    if template is not None and not isinstance(template, str):
        raise PromptError(f"{source}: a chat template must be text, got {type(template).__name__}")
    special_tokens = {
        name: value.get("content") if isinstance(value, dict) else value
        for name, value in tokenizer_config.items()
        if name.endswith("_token") and isinstance(value, (str, dict))
    }
    if template:  # by the markers its text holds: it is rendered only when a prompt is made, bounded
        family = classify(template)
    elif "<|im_start|>" in vocab:
        family = "chatml"
    elif "<|start_header_id|>" in vocab:
        family = "llama3"
    else:
        family = "mistral" if text_model_type == "mistral" else "vicuna"
    if family == "vicuna":
        return PromptFormat(family, None, special_tokens)
    return PromptFormat(family, template, special_tokens, source or "the built-in format")


def classify(template: str) -> str:
    for marker, family in (("[INST]", "mistral"), ("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3")):
        if marker in template:
            return family
    return "vicuna"


MAX_TEMPLATE_BYTES = 16 << 20


def read_optional(path: Path) -> bytes:
    """An optional file's bytes; b"" where it is missing. A file that is there but unreadable,
    not a regular file, or too large is a PromptError naming it."""
    try:
        return read_file(path, MAX_TEMPLATE_BYTES)
    except FileNotFoundError:
        return b""
    except (OSError, ValueError) as e:
        raise PromptError(f"cannot read {path}: {str(e)[:120]}") from None


def read_json_object(path: Path) -> dict:
    """A JSON object, or {} for a missing file or one that holds no object (these files are
    optional); a file that cannot be parsed is a PromptError naming it."""
    try:
        value = files.read_json(path, MAX_TEMPLATE_BYTES)
    except FileProblem as e:
        if e.missing:
            return {}
        raise PromptError(str(e)) from None
    return value if isinstance(value, dict) else {}


def encode(
    tokenizer,
    text: str,
    placeholder: str | None,
    placeholder_id: int | None,
    num_visual: int | list[int] | None,
    bos_token: str | None = None,
    source: str = "the conversation format",
) -> list[int]:
    """Token ids of `text`, each placeholder expanded to its count of placeholder ids (num_visual:
    one count, or one per image in order).

    As LLaVA's tokenizer_image_token: the text around the placeholders is tokenized piece by
    piece, the first piece with the tokenizer's special tokens (BOS) unless the text already
    starts with the BOS token (as transformers' processor decides), the rest without.
    """
    add_bos = not (bos_token and text.startswith(bos_token))
    if placeholder is None:
        return tokenizer.encode(text, add_special_tokens=add_bos).ids
    counts = num_visual if isinstance(num_visual, list) else [num_visual]
    first, *rest = text.split(placeholder)
    if len(rest) != len(counts):  # the question was checked for placeholders: the template made these
        images = "one image" if len(counts) == 1 else f"{len(counts)} images"
        raise PromptError(
            f"{source} rendered {len(rest)} {placeholder!r} placeholders for {images}: it does not put one "
            "placeholder per image"
        )
    ids = tokenizer.encode(first, add_special_tokens=add_bos).ids
    for count, piece in zip(counts, rest, strict=True):
        ids += [placeholder_id] * count + tokenizer.encode(piece, add_special_tokens=False).ids
    return ids


class PromptTokenizer:
    """A checkpoint's tokenizer with its conversation format: question -> prompt ids, ids -> text.

    `placeholder(video)` gives the text and id that stand for an image's or a video's visual tokens
    (the checkpoint config's LlavaConfig.placeholder).
    """

    def __init__(self, tokenizer, conversation: PromptFormat, placeholder):
        self.tokenizer, self.format, self.placeholder = tokenizer, conversation, placeholder

    def conversation(self, question: str, with_media: bool = True, video: bool = False, images: int = 1) -> str:
        """The whole conversation as the text the tokenizer gets, with a placeholder (<image> or
        <video>) where each image's visual tokens go."""
        placeholder = self.placeholder(video)[0] if with_media else None
        return self.format.render(question, placeholder, images)

    def prompt_ids(
        self, question: str, num_visual: int | list[int] | None = None, video: bool = False, inline: bool = False
    ) -> list[int]:
        """Ids of the whole prompt for `question`, with num_visual placeholder ids where the image
        (or video) goes, or one count per image for several; num_visual None: a text-only prompt.
        inline: the question holds the placeholders itself, one per image, where the images go
        (interleaved tasks, as lmms-eval's llava takes them); otherwise it may hold none."""
        placeholder, placeholder_id = self.placeholder(video) if num_visual is not None else (None, None)
        try:
            question.encode("utf-8")
        except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8, kept by Python's argv decoding
            raise PromptError(
                f"the prompt is not valid UTF-8 text (undecodable byte at character {e.start}): "
                "use a UTF-8 terminal or locale, or re-encode the text"
            ) from None
        if placeholder is not None and placeholder in question and not inline:
            raise PromptError(f"the prompt must not contain the placeholder {placeholder!r} itself")
        images = len(num_visual) if isinstance(num_visual, list) else 1
        text = self.format.render(question, None if inline else placeholder, images)
        bos = self.format.special_tokens.get("bos_token")
        return encode(self.tokenizer, text, placeholder, placeholder_id, num_visual, bos, self.format.source)

    def end_of_turn_id(self) -> int | None:
        """The id of the token that ends the assistant's turn in this format, if the vocabulary has it."""
        marker = END_OF_TURN.get(self.format.family)
        return self.tokenizer.token_to_id(marker) if marker else None

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def is_byte(self, token_id: int) -> bool:
        """Whether the token is one of SentencePiece's byte-fallback tokens (<0x41>)."""
        piece = self.tokenizer.id_to_token(token_id) or ""
        return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")

    def settled_text(self, ids: list[int]) -> str | None:
        """The text of `ids` once more tokens can no longer change it, else None (for streaming): a
        run of byte tokens (SentencePiece's byte fallback) decodes as a whole, so it waits for the
        token after it, and a multi-byte character cut off at the end (byte-level tokenizers)
        waits for the rest."""
        if not ids or self.is_byte(ids[-1]):
            return None
        text = self.decode(ids)
        return None if text.endswith("\ufffd") else text

    def encode(self, text: str, add_special_tokens: bool = True):
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
