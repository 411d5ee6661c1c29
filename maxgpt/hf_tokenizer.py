"""The Hugging Face tokenizer files of an export, from a run's sentencepiece model.

`tokenizer.json` is the fast-tokenizer format that transformers (and so lm-evaluation-harness)
reads without sentencepiece or protobuf installed. It is written here as plain JSON, from the
pieces, scores and kinds that sentencepiece reports, so exporting needs neither the
`tokenizers` library nor a protobuf runtime:

- normaliser: sentencepiece's whitespace escape (space -> `▁`; tabs and newlines stay), with
  the dummy `▁` prefix only if the model was trained with one (maxgpt's are not);
- model: BPE with one merge per way of splitting a piece into two pieces, ranked by the
  merged piece's score (sentencepiece merges the best-scoring adjacent pair first), or
  Unigram with the pieces' log-probabilities (sentencepiece sums scores in float32,
  `tokenizers` in float64, so two segmentations of equal score, such as runs of spaces, may
  break differently); byte fallback either way (`<0xNN>` pieces);
- control pieces (`<pad> <s> </s>`) and `<unk>` are special tokens that text never spells:
  `split_special_tokens` keeps a literal "<s>" in a document ordinary text, as in training;
- post-processor: `bos text`, because every document maxgpt trains on starts with bos at
  position 0 (maxgpt.data.tokenizer.encode_document; packing restarts positions and masks
  attention per document). `add_bos_token=False` (tokenizer_config) turns it off.

Only the normalisation maxgpt trains with (`identity`) is written; a tokenizer trained with
another rule (NFKC and its precompiled character map) is refused with a one-line error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from maxgpt.config import ConfigError
from maxgpt.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID

SPECIAL = {PAD_ID: "<pad>", UNK_ID: "<unk>", BOS_ID: "<s>", EOS_ID: "</s>"}
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")


def _fields(buf: bytes):
    """(field number, wire type, value) of one protobuf message, top level only: varints as
    ints, length-delimited fields as bytes (fixed 32/64-bit values as bytes too)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:
            size, i = _varint(buf, i)
            value, i = buf[i:i + size], i + size
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, i = buf[i:i + size], i + size
        else:
            raise ValueError(f"protobuf wire type {wire}")
        yield number, wire, value


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def model_spec(proto: bytes) -> dict[str, Any]:
    """What of sentencepiece's ModelProto the fast tokenizer depends on: the model type (from
    trainer_spec, field 2) and the normaliser's settings (normalizer_spec, field 3), read from
    the protobuf wire format (sentencepiece_model.proto; proto2 defaults where unset)."""
    spec = {"model_type": 1, "byte_fallback": False, "name": "nmt_nfkc", "add_dummy_prefix": True,
            "remove_extra_whitespaces": True, "escape_whitespaces": True}
    trainer = {3: "model_type", 35: "byte_fallback"}
    normalizer = {1: "name", 3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                  5: "escape_whitespaces"}
    for number, _, value in _fields(proto):
        for names, field in ((trainer, 2), (normalizer, 3)):
            if number != field:
                continue
            for n, _, v in _fields(value):
                if n in names:
                    spec[names[n]] = v.decode() if isinstance(v, bytes) else v
    spec["model_type"] = {1: "unigram", 2: "bpe"}.get(spec["model_type"], spec["model_type"])
    for key in ("byte_fallback", "add_dummy_prefix", "remove_extra_whitespaces",
                "escape_whitespaces"):
        spec[key] = bool(spec[key])
    return spec


def tokenizer_json(proto: bytes) -> dict[str, Any]:
    """tokenizer.json for a sentencepiece model: the same ids as sentencepiece for any text,
    plus bos first (the post-processor)."""
    import sentencepiece as spm

    spec = model_spec(proto)
    unsupported = [(spec["model_type"] not in ("bpe", "unigram"),
                    f"model type {spec['model_type']}"),
                   (spec["name"] != "identity", f"normalization {spec['name']!r}"),
                   (spec["remove_extra_whitespaces"], "remove_extra_whitespaces"),
                   (not spec["escape_whitespaces"], "no whitespace escaping"),
                   (not spec["byte_fallback"], "no byte fallback")]
    reasons = [why for bad, why in unsupported if bad]
    if reasons:
        raise ConfigError(f"the run's tokenizer has {', '.join(reasons)}; tokenizer.json is "
                          "written for maxgpt's settings (bpe or unigram, identity "
                          "normalization, byte fallback): retrain it with `maxgpt tokenizer "
                          "train`")
    sp = spm.SentencePieceProcessor(model_proto=proto)
    pieces = [sp.id_to_piece(i) for i in range(sp.get_piece_size())]
    specials = {i for i in range(len(pieces)) if sp.is_control(i) or sp.is_unknown(i)}
    if {i: pieces[i] for i in SPECIAL} != SPECIAL:
        raise ConfigError(f"the run's tokenizer has special pieces "
                          f"{[pieces[i] for i in SPECIAL]} at ids {list(SPECIAL)}, maxgpt "
                          f"expects {list(SPECIAL.values())}")
    if spec["model_type"] == "bpe":
        model = _bpe(sp, pieces, specials)
    else:
        # sentencepiece never matches control or byte pieces in text (a byte piece stands for
        # a byte of a character the vocabulary lacks): a score no segmentation would choose
        model = {"type": "Unigram", "unk_id": UNK_ID, "byte_fallback": True, "vocab": [
            [p, -1e9 if i in specials or sp.is_byte(i) else sp.get_score(i)]
            for i, p in enumerate(pieces)]}
    normalizers = [{"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]
    if spec["add_dummy_prefix"]:
        normalizers.insert(0, {"type": "Prepend", "prepend": "▁"})
    return {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": pieces[i], "single_word": False, "lstrip": False,
                          "rstrip": False, "normalized": False, "special": True}
                         for i in sorted(specials)],
        "normalizer": {"type": "Sequence", "normalizers": normalizers},
        "pre_tokenizer": None,
        "post_processor": _bos_first(),
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            *([{"type": "Strip", "content": " ", "start": 1, "stop": 0}]
              if spec["add_dummy_prefix"] else [])]},
        "model": model}


def _bpe(sp, pieces: list[str], specials: set[int]) -> dict[str, Any]:
    """BPE with sentencepiece's merge order: every (left, right) whose concatenation is a
    piece, the best-scoring merged piece first (ties: left id, then right id)."""
    ids = {p: i for i, p in enumerate(pieces)}
    mergeable = {p for i, p in enumerate(pieces) if i not in specials and not sp.is_byte(i)}
    merges = []
    for i, piece in enumerate(pieces):
        if piece not in mergeable:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in mergeable and right in mergeable:
                merges.append((-sp.get_score(i), i, ids[left], ids[right], left, right))
    merges.sort()
    return {"type": "BPE", "dropout": None, "unk_token": SPECIAL[UNK_ID],
            "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
            "byte_fallback": True, "ignore_merges": False, "vocab": ids,
            "merges": [[left, right] for *_, left, right in merges]}


def _bos_first() -> dict[str, Any]:
    bos = SPECIAL[BOS_ID]
    return {"type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}},
                       {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}},
                     {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}},
                     {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [BOS_ID], "tokens": [bos]}}}


def tokenizer_config(context: int) -> dict[str, Any]:
    """tokenizer_config.json: the generic fast tokenizer over tokenizer.json, bos added (what
    training fed the model), `model_max_length` the trained context."""
    return {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": True,
            "add_eos_token": False, "split_special_tokens": True,
            "clean_up_tokenization_spaces": False, "model_max_length": context,
            **special_tokens_map()}


def special_tokens_map() -> dict[str, str]:
    return {"bos_token": SPECIAL[BOS_ID], "eos_token": SPECIAL[EOS_ID],
            "unk_token": SPECIAL[UNK_ID], "pad_token": SPECIAL[PAD_ID]}


def write_tokenizer_files(out: Path, proto: bytes, fast: dict[str, Any], context: int) -> None:
    """tokenizer.model (for sentencepiece users and `maxgpt import`), tokenizer.json (`fast`,
    from tokenizer_json(proto)), tokenizer_config.json and special_tokens_map.json."""
    (out / "tokenizer.model").write_bytes(proto)
    (out / "tokenizer.json").write_text(json.dumps(fast, ensure_ascii=False))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(context), indent=2))
    (out / "special_tokens_map.json").write_text(json.dumps(special_tokens_map(), indent=2))
