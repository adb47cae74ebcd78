"""prompt.py: each family's conversation format and tokenization, as LLaVA trained it."""

import json
import re
import shutil

import pytest
import transformers as tf

import conftest
import model
import prompt
from conftest import FAMILIES, QUESTION, cli_args, noise_image, one_line_error

# The documented prompt of each family (transformers' LLaVA-NeXT model card), for "q" and an image.
DOCUMENTED_FORMATS = {
    "vicuna": prompt.VICUNA_SYSTEM + " USER: <image>\nq ASSISTANT:",
    "mistral": "[INST] <image>\nq [/INST]",
    "chatml": "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nq<|im_end|>"
    "<|im_start|>assistant\n",
    "llama3": "<|start_header_id|>system<|end_header_id|>\n\n" + prompt.LLAMA3_SYSTEM + "<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\n<image>\nq<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n",
}


@pytest.mark.parametrize("name", ["mha", *FAMILIES])
def test_checkpoints_without_a_chat_template_fall_back_on_the_built_in_format(name, families, mha, tmp_path):
    ckpt = mha if name == "mha" else families(name)
    directory = tmp_path / name
    shutil.copytree(ckpt.directory, directory)
    (directory / "chat_template.jinja").unlink()
    _, tokenizer = model.load(str(directory))
    assert tokenizer.format.family == ckpt.tokenizer.format.family and tokenizer.format.chat_template is None
    assert tokenizer.format.render("q", "<image>") == DOCUMENTED_FORMATS[ckpt.family]


def test_vicuna_gets_llavas_literal_system_prompt(mha):
    """The deliberate exception to transformers' rendering: LLaVA's evaluation prompted Vicuna with
    its system prompt, which llava-hf's template leaves out unless given as a system message."""
    ours = mha.tokenizer.format.render(QUESTION, "<image>")
    assert ours == DOCUMENTED_FORMATS["vicuna"].replace("q ASSISTANT", QUESTION + " ASSISTANT")
    without = mha.processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    assert ours == prompt.VICUNA_SYSTEM + " " + without and mha.hf_text() == ours


def llama_style_tokenizer_dir(directory, legacy):
    """A Llama-2-style tokenizer saved with transformers' tokenizer_config.json `legacy` setting."""
    directory.mkdir()
    conftest.sentencepiece_style_tokenizer(["<image>"]).save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    (directory / "tokenizer_config.json").write_text(
        json.dumps(config | ({"legacy": legacy} if legacy is not None else {}))
    )
    return tf.AutoTokenizer.from_pretrained(str(directory))


def test_sentencepiece_families_keep_the_piece_after_image_as_llava_trained(mha, tmp_path):
    """LLaVA's tokenizer_image_token tokenized each side of <image> alone, so the text after it
    starts with SentencePiece's '▁' again; transformers with legacy: true agrees, with legacy:
    false (or unset) drops exactly that one piece."""
    text = mha.tokenizer.format.render(QUESTION, "<image>")
    ours = prompt.encode(mha.tokenizer.tokenizer, text, "<image>", mha.image_token, 1)
    legacy = {setting: llama_style_tokenizer_dir(tmp_path / str(setting), setting) for setting in (True, False, None)}
    before, after = text.split("<image>")  # LLaVA's reading: chunks, BOS only on the first
    llava_reading = legacy[True](before)["input_ids"] + [mha.image_token] + legacy[True](after)["input_ids"][1:]
    assert ours == llava_reading == legacy[True](text)["input_ids"]
    at = ours.index(mha.image_token)
    assert mha.tokenizer.tokenizer.id_to_token(ours[at + 1]) == "▁"
    assert legacy[False](text)["input_ids"] == legacy[None](text)["input_ids"] == ours[: at + 1] + ours[at + 2 :]
    # A tokenizer.json saved the non-legacy way ('▁' prepended to the first piece only) still gives
    # LLaVA's ids: the text after the image is encoded on its own.
    non_legacy = legacy[False].backend_tokenizer
    assert non_legacy.encode(text).ids != ours
    assert prompt.encode(non_legacy, text, "<image>", mha.image_token, 1) == ours


def test_llama3_prompt_has_one_bos_and_no_piece_after_the_image(families):
    llama3 = families("llama3")
    ids = llama3.prompt(5).tolist()
    bos = llama3.tokenizer.tokenizer.token_to_id("<|begin_of_text|>")
    assert ids.count(bos) == 1 and ids[0] == bos
    assert llama3.tokenizer.tokenizer.id_to_token(ids[ids.index(llama3.image_token) + 5]) != "▁"


def test_a_template_that_renders_two_placeholders_is_blamed_not_the_question(mha, tmp_path, capsys):
    directory = tmp_path / "two"
    shutil.copytree(mha.directory, directory)
    (directory / "chat_template.jinja").write_text(
        "[INST] {% for c in messages[0]['content'] %}{% if c['type'] == 'image' %}<image>\n<image>\n{% endif %}"
        "{% endfor %}q [/INST]"
    )
    noise_image(60, 40).save(tmp_path / "a.png")
    one_line_error(
        capsys,
        cli_args(mha, "--model", str(directory), "--image", str(tmp_path / "a.png")),
        f"the chat template in {directory / 'chat_template.jinja'} rendered 2 '<image>' placeholders for one image",
    )


def test_a_chat_template_is_rendered_only_when_a_prompt_is_made(mha, tmp_path):
    directory = tmp_path / "lazy"
    shutil.copytree(mha.directory, directory)
    (directory / "chat_template.jinja").write_text("[INST] {{ 1 / 0 }} [/INST]")
    _, tokenizer = model.load(str(directory))  # loading reads the template's markers, runs none of it
    assert tokenizer.format.family == "mistral"
    with pytest.raises(prompt.PromptError, match="chat_template.jinja cannot be rendered .ZeroDivisionError"):
        tokenizer.prompt_ids(QUESTION)


@pytest.mark.parametrize(
    "template, message",
    [
        ("{% set s = 'x' * 65536 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "loops more than"),
        ("{% for m in messages * 60000 %}{% for c in m.content %}{% endfor %}{% endfor %}", "loops more than"),
        ("{{ ''|center(1000000000) }}", "center would build 1000000000 characters"),
        ("{{ ''.center(1000000000) }}", "center would build 1000000000 characters"),
        ("{{ ''.ljust(1000000000) }}", "ljust would build 1000000000 characters"),
        ("{{ ('x' * 65536)|replace('x', 'x' * 65536) }}", "replace would build 4294967296 characters"),
        ("{{ ('x' * 65536).replace('x', 'x' * 65536) }}", "replace would build 4294967296 characters"),
        ("{{ ('x' * 65536)|list|join('y' * 65536) }}", "join would build"),
        ("{{ ('y' * 65536).join('x' * 65536) }}", "join would build"),
        ("{{ '%999999999s'|format(1) }}", "format would build 999999999 characters"),
        ("{{ '{:>999999999}'.format(1) }}", "format would build 999999999 characters"),
        ("{{ '{0:{1}}'.format(1, 999999999) }}", "format would build 999999999 characters"),
        ("{{ '%*s' % (999999999, 'x') }}", "% would build 999999999 characters"),
        ("{{ ('x\n' * 60000)|indent(60000) }}", "indent would build"),
    ],
)
def test_hostile_templates_stop_in_a_moment_with_one_line(template, message):
    """Every string-building filter and method, and every loop, is bounded before the work is done:
    no template makes gigabytes of text or billions of steps."""
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    with pytest.raises(prompt.PromptError, match=f"cannot be rendered \\(SecurityError: {re.escape(message)}"):
        prompt.render_template(template, messages, {})


def test_bounded_templates_still_render_what_real_ones_use():
    template = (
        "{% for m in messages %}{{ m.role|upper }}: {% for c in m.content %}{{ c.text|replace('a', 'b')|trim }}"
        "{% endfor %}{{ ', '.join(['x', 'y']) }} {{ ['p', 'q']|join('-') }} {{ '%s=%d' % ('n', 3) }} "
        "{{ '{}!'.format('ok') }}{{ 'a\nb'|indent(2) }}{% for i in range(3) %}{{ loop.index }}{% endfor %}{% endfor %}"
    )
    messages = [{"role": "user", "content": [{"type": "text", "text": " banana "}]}]
    assert prompt.render_template(template, messages, {}) == "USER: bbnbnbx, y p-q n=3 ok!a\n  b123"
