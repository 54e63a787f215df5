"""Chat templates: the plain fallback (tandem-tiny) and real jinja templates, as transformers
renders them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from services.engine.chat_template import PLAIN_TEMPLATE, load_chat_template
from services.engine.errors import CheckpointError, InvalidRequestError
from services.engine.tokenizer import Tokenizer

# Zephyr's template: special tokens written by the template itself, eos after each turn.
ZEPHYR = (
    "{% for message in messages %}\n{% if message['role'] == 'user' %}\n"
    "{{ '<|user|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'system' %}\n"
    "{{ '<|system|>\n' + message['content'] + eos_token }}\n"
    "{% elif message['role'] == 'assistant' %}\n"
    "{{ '<|assistant|>\n'  + message['content'] + eos_token }}\n{% endif %}\n"
    "{% if loop.last and add_generation_prompt %}\n{{ '<|assistant|>' }}\n{% endif %}\n"
    "{% endfor %}"
)
# Llama 2's: bos per turn, system folded into the first user turn, strict alternation.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)
CHAT = [
    ("system", "Be brief."),
    ("user", "Hi there"),
    ("assistant", "Hello."),
    ("user", "Ünïcode?"),
]


def _model_with_template(tiny_model_dir: Path, tmp_path: Path, template: object) -> Path:
    directory = tmp_path / "model"
    shutil.copytree(tiny_model_dir, directory)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = template
    config_file.write_text(json.dumps(config))
    return directory


def test_a_model_without_a_template_gets_the_plain_one(tiny_model_dir: Path) -> None:
    chat = load_chat_template(tiny_model_dir)
    assert chat.source == PLAIN_TEMPLATE and not chat.from_model
    text = chat.render(CHAT)
    assert (
        text == "system: Be brief.\nuser: Hi there\nassistant: Hello.\nuser: Ünïcode?\nassistant:"
    )
    # Plain text is tokenized like any prompt: tandem-tiny's BOS comes from its tokenizer.
    assert chat.add_special_tokens
    tokenizer = Tokenizer.from_dir(tiny_model_dir)
    assert tokenizer.encode(text)[0] == tokenizer.bos_token_id


@pytest.mark.parametrize("template", [ZEPHYR, LLAMA2], ids=["zephyr", "llama2"])
def test_a_model_template_renders_as_transformers_does(
    tiny_model_dir: Path, tmp_path: Path, template: str
) -> None:
    transformers = pytest.importorskip("transformers")
    directory = _model_with_template(tiny_model_dir, tmp_path, template)
    chat = load_chat_template(directory)
    assert chat.from_model and not chat.add_special_tokens
    messages = CHAT if template is ZEPHYR else CHAT[:2]
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    expected = reference.apply_chat_template(
        [{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=True,
        tokenize=False,
    )
    assert chat.render(messages) == expected
    # Token ids too: the template writes its own special tokens, none are added on top.
    tokenizer = Tokenizer.from_dir(directory)
    ids = tokenizer.encode(chat.render(messages), add_special_tokens=chat.add_special_tokens)
    assert ids == list(reference(expected, add_special_tokens=False)["input_ids"])


def test_chat_template_jinja_file_wins_and_named_templates_use_default(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "D"}]
    directory = _model_with_template(tiny_model_dir, tmp_path, named)
    assert load_chat_template(directory).render([("user", "x")]) == "D"
    (directory / "chat_template.jinja").write_text("{{ bos_token }}J{{ messages|length }}")
    assert load_chat_template(directory).render([("user", "x")]) == "<s>J1"


def test_generation_blocks_loopcontrols_and_tojson_work(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    template = (
        "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
        "{% generation %}{{ m | tojson }}{% endgeneration %}{% endfor %}"
    )
    chat = load_chat_template(_model_with_template(tiny_model_dir, tmp_path, template))
    assert chat.render([("user", "é<b>"), ("user", "dropped")]) == (
        '{"role": "user", "content": "é<b>"}'
    )


def test_refusals_name_the_field(tiny_model_dir: Path, tmp_path: Path) -> None:
    chat = load_chat_template(_model_with_template(tiny_model_dir, tmp_path, LLAMA2))
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        chat.render([("user", "a"), ("user", "b")])
    assert err.value.field == "messages"
    with pytest.raises(InvalidRequestError) as err:
        chat.render([("user", "a"), ("", "b")])
    assert err.value.field == "messages[1].role"
    with pytest.raises(InvalidRequestError, match="is empty"):
        chat.render([])


def test_a_broken_template_is_a_checkpoint_error(tiny_model_dir: Path, tmp_path: Path) -> None:
    directory = _model_with_template(tiny_model_dir, tmp_path, "{% for m in messages %}")
    with pytest.raises(CheckpointError, match=r"tokenizer_config.json: the chat template"):
        load_chat_template(directory)
    directory = _model_with_template(tiny_model_dir, tmp_path / "2", 42)
    with pytest.raises(CheckpointError, match="chat_template must be a string"):
        load_chat_template(directory)
    # The sandbox refuses attribute tricks; that is the template's fault, not the caller's.
    directory = _model_with_template(
        tiny_model_dir, tmp_path / "3", "{{ messages.__class__.__mro__ }}"
    )
    with pytest.raises((CheckpointError, InvalidRequestError)):
        load_chat_template(directory).render([("user", "x")])


def test_special_tokens_map_tools_and_mask_token_render_as_transformers_does(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """Three ways the variables differed from transformers': special_tokens_map.json was not
    read (its eos_token wins over tokenizer_config.json's; a Mistral v0.1-style template
    found eos_token undefined), tools/documents were undefined rather than None (so
    ``tools is not none`` was true), and mask_token was missing."""
    transformers = pytest.importorskip("transformers")
    template = (
        "{% if tools is not none %}TOOLS{% endif %}{% if documents is defined %}D{% endif %}"
        "{{ bos_token }}{% for m in messages %}{{ m['content'] + eos_token }}{% endfor %}"
        "{{ mask_token }}"
    )
    directory = _model_with_template(tiny_model_dir, tmp_path, template)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"], config["mask_token"] = "</s>", "<pad>"
    config_file.write_text(json.dumps(config))
    (directory / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<pad>"}))
    chat = load_chat_template(directory)
    reference = transformers.PreTrainedTokenizerFast.from_pretrained(str(directory))
    expected = reference.apply_chat_template(
        [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
    )
    assert chat.render([("user", "Hi")]) == expected == "D<s>Hi<pad><pad>"


def test_an_empty_list_of_named_templates_is_a_checkpoint_error(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    """It fell back to the plain template silently; transformers refuses it."""
    with pytest.raises(CheckpointError, match="'default' entry"):
        load_chat_template(_model_with_template(tiny_model_dir, tmp_path, []))


def test_a_jinja2_with_known_sandbox_escapes_renders_no_template(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("jinja2.__version__", "3.1.5")
    with pytest.raises(CheckpointError, match=r"sandbox escapes.*jinja2>=3\.1\.6"):
        load_chat_template(_model_with_template(tiny_model_dir, tmp_path, ZEPHYR))
