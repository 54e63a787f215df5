"""The embedded default model "tandem-tiny", created deterministically on first use.

Tandem must run offline with no download, so it builds its own small
Llama-architecture checkpoint in Hugging Face format: a byte-level BPE
tokenizer trained on a corpus generated here from a seed, and seeded random
weights. The same code and seed give byte-identical files, so every process
(and every machine) that builds it agrees on token ids and weights.

torch is imported only while writing weights: importing this module, or finding
the model already cached, needs no torch (the router resolves models too).
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

TINY_MODEL_NAME = "tandem-tiny"
TINY_MODEL_VERSION = 1
"""Bump whenever the generated files change, so stale caches are not reused."""

BOS_TOKEN = "<s>"
EOS_TOKEN = "</s>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
"""Trained first, so their ids are 0, 1 and 2 in this order."""


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape and seeds of tandem-tiny (changing any field needs a version bump)."""

    vocab_size: int = 4096
    """Tokenizer vocabulary, special tokens included; the embedding has as many rows."""
    hidden_size: int = 512
    """Width of the residual stream."""
    intermediate_size: int = 1408
    """Width of the SwiGLU MLP."""
    num_hidden_layers: int = 8
    """Decoder layers."""
    num_attention_heads: int = 8
    """Query heads."""
    num_key_value_heads: int = 4
    """KV heads (grouped-query attention: two query heads share one KV head)."""
    head_dim: int = 64
    """Width of one attention head."""
    max_position_embeddings: int = 4096
    """Longest sequence the model (and tokenizer config) admits."""
    rope_theta: float = 10000.0
    """RoPE base frequency."""
    rms_norm_eps: float = 1e-5
    """Epsilon of every RMSNorm."""
    weight_seed: int = 20250101
    """Seed of the torch.Generator that draws the weights."""
    corpus_seed: int = 7
    """Seed of the random.Random that writes the tokenizer's training corpus."""
    corpus_lines: int = 30000
    """Lines of generated training text; enough distinct words to fill the vocabulary."""


TINY_SPEC = TinyModelSpec()


def default_models_root() -> Path:
    """Where built-in models are cached: $TANDEM_HOME/models, else ~/.cache/tandem/models."""
    home = os.environ.get("TANDEM_HOME")
    if home:
        return Path(home).expanduser() / "models"
    return Path.home() / ".cache" / "tandem" / "models"


def tiny_model_dir_name() -> str:
    return f"{TINY_MODEL_NAME}-v{TINY_MODEL_VERSION}"


def ensure_tiny_model(root: Path | None = None) -> Path:
    """Return the tandem-tiny directory under ``root``, building it on first call.

    The model is written into a temporary directory beside the final one and
    renamed into place, so a concurrent reader sees either nothing or the whole
    model. If another process wins the race, its (identical) copy is used.
    """
    root = default_models_root() if root is None else Path(root)
    final = root / tiny_model_dir_name()
    if final.is_dir():
        return final
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{tiny_model_dir_name()}.", dir=root))
    try:
        # mkdtemp makes the directory private (0700); the cache is meant to be shared.
        staging.chmod(0o755)
        write_tiny_model(staging)
        try:
            staging.rename(final)
        except OSError:
            # rename(2) refuses to replace a non-empty directory: another process
            # finished first. Its files are byte-identical, so use them.
            if not final.is_dir():
                raise
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return final


def write_tiny_model(directory: Path, spec: TinyModelSpec = TINY_SPEC) -> None:
    """Write every file of tandem-tiny into an existing, empty ``directory``."""
    tokenizer = build_tiny_tokenizer(spec)
    write_tokenizer_files(directory, tokenizer, spec)
    ids = _special_ids(tokenizer)
    _write_json(directory / "config.json", _model_config(spec, ids))
    _write_json(directory / "generation_config.json", _generation_config(ids))
    _write_weights(directory / "model.safetensors", spec)
    (directory / "README.md").write_text(_readme(spec), encoding="utf-8")


def write_tokenizer_files(
    directory: Path, tokenizer: HFTokenizer, spec: TinyModelSpec = TINY_SPEC
) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json."""
    (directory / "tokenizer.json").write_text(tokenizer.to_str(pretty=True), encoding="utf-8")
    _write_json(directory / "tokenizer_config.json", _tokenizer_config(spec))
    _write_json(
        directory / "special_tokens_map.json",
        {"bos_token": BOS_TOKEN, "eos_token": EOS_TOKEN, "pad_token": PAD_TOKEN},
    )


def build_tiny_tokenizer(spec: TinyModelSpec = TINY_SPEC) -> HFTokenizer:
    """Train the byte-level BPE tokenizer on the generated corpus."""
    tokenizer = HFTokenizer(models.BPE())
    # No normalizer and no prefix space: every string maps to its exact UTF-8
    # bytes, so any text round-trips through encode and decode.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(tiny_corpus(spec.corpus_seed, spec.corpus_lines), trainer)
    if tokenizer.get_vocab_size(with_added_tokens=True) != spec.vocab_size:
        # The corpus is fixed by the seed, so this only fires when the generator
        # or the word list is edited into something too small to fill the vocabulary.
        raise RuntimeError(
            f"tandem-tiny tokenizer trained to {tokenizer.get_vocab_size()} tokens, "
            f"expected {spec.vocab_size}: the generated corpus is too small"
        )
    bos_id = tokenizer.token_to_id(BOS_TOKEN)
    # Llama-style: BOS before every sequence, nothing after (EOS is the model's to emit).
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS_TOKEN} $A",
        pair=f"{BOS_TOKEN} $A {BOS_TOKEN} $B",
        special_tokens=[(BOS_TOKEN, bos_id)],
    )
    return tokenizer


# A few hundred common English words; sentences, identifiers and comments are drawn from them.
_WORD_TEXT = """
the of and to a in is it you that he was for on are with as I his they be at one have this
from or had by hot word but what some we can out other were all there when up use your how
said an each she which do their time if will way about many then them write would like so
these her long make thing see him two has look more day could go come did number sound no
most people my over know water than call first who may down side been now find any new work
part take get place made live where after back little only round man year came show every
good me give our under name very through just form sentence great think say help low line
differ turn cause much mean before move right boy old too same tell does set three want air
well also play small end put home read hand port large spell add even land here must big
high such follow act why ask men change went light kind off need house picture try us again
animal point mother world near build self earth father head stand own page should country
found answer school grow study still learn plant cover food sun four between state keep eye
never last let thought city tree cross farm hard start might story saw far sea draw left late
run while press close night real life few north open seem together next white children begin
got walk example ease paper group always music those both mark often letter until mile river
car feet care second book carry took science eat room friend began idea fish mountain stop
once base hear horse cut sure watch color face wood main enough plain girl usual young ready
above ever red list though feel talk bird soon body dog family direct pose leave song measure
door product black short numeral class wind question happen complete ship area half rock order
fire south problem piece told knew pass since top whole king space heard best hour better true
during hundred five remember step early hold west ground interest reach fast verb sing listen
six table travel less morning ten simple several vowel toward war lay against pattern slow
center love person money serve appear road map rain rule govern pull cold notice voice unit
power town fine certain fly fall lead cry dark machine note wait plan figure star box noun
field rest correct able pound done beauty drive stood contain front teach week final gave
green oh quick develop ocean warm free minute strong special mind behind clear tail produce
fact street inch multiply nothing course stay wheel full force blue object decide surface deep
moon island foot system busy test record boat common gold possible plane stead dry wonder laugh
thousand ago ran check game shape equate miss brought heat snow tire bring yes distant fill
east paint language among grand ball yet wave drop heart present heavy dance engine position
arm wide sail material size vary settle speak weight general ice matter circle pair include
divide syllable felt perhaps pick sudden count square reason length represent art subject
region energy hunt probable bed brother egg ride cell believe fraction forest sit race window
store summer train sleep prove lone exercise wall catch mount wish sky board joy winter sat
written wild instrument kept glass grass cow job edge sign visit past soft fun bright gas
weather month million bear finish happy hope flower clothe strange gone jump baby eight village
meet root buy raise solve metal whether push seven paragraph third shall held hair describe
cook floor either result burn hill safe cat century consider type law bit coast copy phrase
silent tall sand soil roll temperature finger industry value fight lie beat excite natural view
sense ear else quite broke case middle kill son lake moment scale loud spring observe child
straight consonant nation dictionary milk speed method organ pay age section dress cloud
surprise quiet stone tiny climb cool design poor lot experiment bottom key iron single stick
flat twenty skin smile crease hole trade melody trip office receive row mouth exact symbol die
least trouble shout except wrote seed tone join suggest clean break lady yard rise bad blow oil
blood touch grew cent mix team wire cost lost brown wear garden equal sent choose fell fit flow
fair bank collect save control decimal gentle woman captain practice separate difficult doctor
please protect noon whose locate ring character insect caught period indicate radio spoke atom
human history effect electric expect crop modern element hit student corner party supply bone
rail imagine provide agree thus capital chair danger fruit rich thick soldier process operate
guess necessary sharp wing create neighbor wash bat rather crowd corn compare poem string bell
depend meat rub tube famous dollar stream fear sight thin triangle planet hurry chief colony
clock mine tie enter major fresh search send yellow gun allow print dead spot desert suit
current lift rose continue block chart hat sell success company subtract event particular deal
swim term opposite wife shoe shoulder spread arrange camp invent cotton born determine quart
nine truck noise level chance gather shop stretch throw shine property column molecule select
wrong gray repeat require broad prepare salt nose plural anger claim continent oxygen sugar
death pretty skill women season solution magnet silver thank branch match suffix especially fig
afraid huge sister steel discuss forward similar guide experience score apple bought led pitch
coat mass card band rope slip win dream evening condition feed tool total basic smell valley nor
double seat arrive master track parent shore division sheet substance favor connect post spend
chord fat glad original share station dad bread charge proper bar offer segment slave duck
instant market degree populate chick dear enemy reply drink occur support speech nature range
steam motion path liquid log meant quotient teeth shell neck
"""
_WORDS = tuple(_WORD_TEXT.split())

_CODE_TEXT = (
    "def return class import from if else elif for while in not and or None True False "
    "self print range len list dict str int float yield lambda try except raise with as pass"
)
_CODE_WORDS = tuple(_CODE_TEXT.split())
_PUNCT = (".", ".", ".", "!", "?", ";", ":")


def tiny_corpus(seed: int, lines: int) -> Iterator[str]:
    """Yield ``lines`` lines of seeded prose, code and numbers (the tokenizer's training text)."""
    rng = random.Random(seed)
    makers = (_prose_line, _prose_line, _prose_line, _code_line, _number_line)
    for _ in range(lines):
        yield rng.choice(makers)(rng)


def _prose_line(rng: random.Random) -> str:
    words = [rng.choice(_WORDS) for _ in range(rng.randint(4, 16))]
    words[0] = words[0].capitalize()
    if len(words) > 6 and rng.random() < 0.5:
        words[rng.randint(2, len(words) - 3)] += ","
    if rng.random() < 0.2:
        words.insert(rng.randint(1, len(words)), str(rng.randint(0, 9999)))
    if rng.random() < 0.1:
        words[rng.randint(0, len(words) - 1)] = f'"{rng.choice(_WORDS)}"'
    return " ".join(words) + rng.choice(_PUNCT)


def _identifier(rng: random.Random) -> str:
    return "_".join(rng.choice(_WORDS).lower() for _ in range(rng.randint(1, 3)))


def _code_line(rng: random.Random) -> str:
    name, arg, other = _identifier(rng), _identifier(rng), _identifier(rng)
    num = rng.randint(0, 4096)
    templates = (
        f"def {name}({arg}, {other}={num}):",
        f"    return {name}({arg}) + {num}",
        f"{name} = [{num}, {rng.randint(0, 99)}, {arg}]",
        f"if {arg} > {num} and not {other}:",
        f"for {arg} in range({num}):",
        f'    print(f"{{{arg}}} {rng.choice(_WORDS)}")',
        f"# {rng.choice(_WORDS)} {rng.choice(_WORDS)} {rng.choice(_WORDS)}",
        f'{{"{name}": {num}, "{arg}": "{rng.choice(_WORDS)}"}}',
        f"{rng.choice(_CODE_WORDS)} {name}.{arg}({other}[{num}])",
        f"class {name.title().replace('_', '')}({other.title().replace('_', '')}):",
    )
    return rng.choice(templates)


def _number_line(rng: random.Random) -> str:
    count = rng.randint(2, 8)
    numbers = [str(rng.randint(0, 10 ** rng.randint(1, 6))) for _ in range(count)]
    joiner = rng.choice((", ", " ", " + ", " * ", "-", "/"))
    return f"{rng.choice(_WORDS).capitalize()} {joiner.join(numbers)} {rng.choice(_WORDS)}."


def _special_ids(tokenizer: HFTokenizer) -> dict[str, int]:
    ids = {}
    for key, token in (("bos", BOS_TOKEN), ("eos", EOS_TOKEN), ("pad", PAD_TOKEN)):
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise RuntimeError(f"tandem-tiny tokenizer lacks its special token {token!r}")
        ids[key] = token_id
    return ids


def _model_config(spec: TinyModelSpec, ids: dict[str, int]) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_hidden_layers,
        "num_attention_heads": spec.num_attention_heads,
        "num_key_value_heads": spec.num_key_value_heads,
        "head_dim": spec.head_dim,
        "max_position_embeddings": spec.max_position_embeddings,
        "rope_theta": spec.rope_theta,
        "rope_scaling": None,
        "rms_norm_eps": spec.rms_norm_eps,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "use_cache": True,
        "torch_dtype": "bfloat16",
        "bos_token_id": ids["bos"],
        "eos_token_id": ids["eos"],
        "pad_token_id": ids["pad"],
    }


def _generation_config(ids: dict[str, int]) -> dict[str, Any]:
    return {"bos_token_id": ids["bos"], "eos_token_id": ids["eos"], "pad_token_id": ids["pad"]}


def _tokenizer_config(spec: TinyModelSpec) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": PAD_TOKEN,
        "add_bos_token": True,
        "add_eos_token": False,
        # transformers' clean-up rewrites " ." as "." and would break round-trips.
        "clean_up_tokenization_spaces": False,
        "model_max_length": spec.max_position_embeddings,
    }


def _weight_shapes(spec: TinyModelSpec) -> list[tuple[str, tuple[int, ...], float]]:
    """(name, shape, std) of every tensor in a fixed order; std 0 marks a norm (all ones).

    Projections into the residual stream are scaled down by sqrt(2 * layers) so
    the stream does not blow up with depth; the LM head is wide enough that
    logits spread over a few units, so greedy choices have clear margins and
    sampling is neither uniform nor one-hot.
    """
    hidden, inter = spec.hidden_size, spec.intermediate_size
    q_width = spec.num_attention_heads * spec.head_dim
    kv_width = spec.num_key_value_heads * spec.head_dim
    residual = 1.0 / math.sqrt(2 * spec.num_hidden_layers)
    shapes: list[tuple[str, tuple[int, ...], float]] = [
        ("model.embed_tokens.weight", (spec.vocab_size, hidden), 1.0)
    ]
    for i in range(spec.num_hidden_layers):
        p = f"model.layers.{i}"
        shapes += [
            (f"{p}.input_layernorm.weight", (hidden,), 0.0),
            (f"{p}.self_attn.q_proj.weight", (q_width, hidden), hidden**-0.5),
            (f"{p}.self_attn.k_proj.weight", (kv_width, hidden), hidden**-0.5),
            (f"{p}.self_attn.v_proj.weight", (kv_width, hidden), hidden**-0.5),
            (f"{p}.self_attn.o_proj.weight", (hidden, q_width), q_width**-0.5 * residual),
            (f"{p}.post_attention_layernorm.weight", (hidden,), 0.0),
            (f"{p}.mlp.gate_proj.weight", (inter, hidden), hidden**-0.5),
            (f"{p}.mlp.up_proj.weight", (inter, hidden), hidden**-0.5),
            (f"{p}.mlp.down_proj.weight", (hidden, inter), inter**-0.5 * residual),
        ]
    shapes += [
        ("model.norm.weight", (hidden,), 0.0),
        ("lm_head.weight", (spec.vocab_size, hidden), 4.0 * hidden**-0.5),
    ]
    return shapes


def _write_weights(path: Path, spec: TinyModelSpec) -> None:
    """Draw every tensor from one seeded generator, in a fixed order, and save as bf16."""
    import torch  # deferred: only building the model needs torch
    from safetensors.torch import save_file

    generator = torch.Generator(device="cpu").manual_seed(spec.weight_seed)
    tensors: dict[str, torch.Tensor] = {}
    for name, shape, std in _weight_shapes(spec):
        if std == 0.0:
            tensors[name] = torch.ones(shape, dtype=torch.bfloat16)
        else:
            drawn = torch.randn(shape, generator=generator, dtype=torch.float32) * std
            tensors[name] = drawn.to(torch.bfloat16)
    # transformers refuses safetensors files without a "format" entry.
    save_file(tensors, str(path), metadata={"format": "pt"})
    # save_file creates the file owner-only; the model cache is meant to be shared.
    path.chmod(0o644)


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _readme(spec: TinyModelSpec) -> str:
    return f"""# {TINY_MODEL_NAME} (v{TINY_MODEL_VERSION})

Tandem's embedded default model, generated on this machine so that Tandem runs
offline. It is a Llama-architecture checkpoint in Hugging Face format with
**random weights**: its output is not meaningful text. It exists to exercise the
serving path (tokenizer, paged KV cache, scheduler, sampler, KV transfer) end to
end and to compare the engine against transformers on identical weights.

- {spec.num_hidden_layers} layers, hidden size {spec.hidden_size}, \
{spec.num_attention_heads} query heads / {spec.num_key_value_heads} KV heads \
of width {spec.head_dim}, SwiGLU MLP of width {spec.intermediate_size}, bf16 weights
- byte-level BPE tokenizer with {spec.vocab_size} tokens, trained on text that
  Tandem generates from a fixed seed; `<s>` is prepended to every prompt, `</s>`
  ends generation
- weights drawn from torch.Generator seed {spec.weight_seed}; rebuilding gives
  byte-identical files

Delete this directory to have Tandem rebuild it.
"""
