"""MemoSight tokens and memosight.json."""

import json

import pytest
from transformers import AutoTokenizer

from helpers import make_bpe_tokenizer
from mlx_memosight.config import (
    CONFIG_FILE,
    SPECIAL_TOKENS,
    ConfigError,
    MemoSightConfig,
    add_memosight_tokens,
    build_config,
    description_ids,
    has_memosight_tokens,
    memory_count,
)


def check_spec_order(tokenizer):
    base = len(tokenizer)
    added = add_memosight_tokens(tokenizer)
    assert [t for t, _ in added] == [t for t, _ in SPECIAL_TOKENS]
    for i, (token, _) in enumerate(SPECIAL_TOKENS):
        assert tokenizer.convert_tokens_to_ids(token) == base + i, token
    nn = base + 7
    assert tokenizer.convert_tokens_to_ids("\n\n") == nn
    ids = tokenizer.encode("step one\n\nstep two", add_special_tokens=False)
    assert nn in ids
    assert tokenizer.decode(ids) == "step one\n\nstep two"
    # descriptions tokenise after the additions: the splitter's is the new token
    assert description_ids(tokenizer, "\n\n") == [nn]
    # adding again adds nothing
    assert add_memosight_tokens(tokenizer) == []
    assert len(tokenizer) == base + len(SPECIAL_TOKENS)
    return base


def test_qwen2_tokenizer_gets_spec_order(qwen2_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(qwen2_tokenizer_path)
    assert "\n\n" not in tok.get_vocab()
    base = check_spec_order(tok)
    cfg = build_config(tok, "qwen2")
    assert cfg.token_ids.splitter == base
    assert cfg.token_ids.continue_ == base + 1
    assert cfg.token_ids.foresight == base + 8
    assert cfg.token_ids.memory == list(range(base + 9, base + 309))
    assert cfg.token_ids.eos == tok.convert_tokens_to_ids("<|im_end|>")
    assert cfg.token_ids.bos == tok.convert_tokens_to_ids("<|im_start|>")
    assert (cfg.compression_ratio, cfg.max_offset) == (6, 2)
    assert (cfg.lm_loss_weight, cfg.mtp_loss_weight) == (0.7, 0.3)
    assert cfg.template.name == "qwen"
    prompt = cfg.template.render("What is 2+2?", system="Be brief.")
    assert prompt == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.encode(prompt, add_special_tokens=False)
    assert ids[0] == cfg.token_ids.bos


def test_llama3_tokenizer_gets_spec_order(llama3_tokenizer_path):
    tok = AutoTokenizer.from_pretrained(llama3_tokenizer_path)
    base = check_spec_order(tok)
    cfg = build_config(tok, "llama")
    assert cfg.token_ids.splitter == base
    assert cfg.token_ids.eos == tok.convert_tokens_to_ids("<|eot_id|>")
    assert cfg.token_ids.bos == tok.convert_tokens_to_ids("<|begin_of_text|>")
    assert (cfg.compression_ratio, cfg.max_offset, cfg.lm_loss_weight) == (5, 3, 1.0)
    assert cfg.template.name == "llama3"


def test_self_contained_tokenizer(tmp_path):
    tok = make_bpe_tokenizer()
    check_spec_order(tok)
    assert has_memosight_tokens(tok)


def test_only_missing_tokens_are_added():
    tok = make_bpe_tokenizer()
    tok.add_tokens(["<|continue|>"], special_tokens=True)
    cont = tok.convert_tokens_to_ids("<|continue|>")
    added = add_memosight_tokens(tok)
    assert "<|continue|>" not in [t for t, _ in added]
    assert tok.convert_tokens_to_ids("<|continue|>") == cont
    assert tok.convert_tokens_to_ids("<|splitter|>") == cont + 1


def test_memosight_json_round_trip(tmp_path):
    tok = make_bpe_tokenizer()
    add_memosight_tokens(tok)
    cfg = build_config(tok, "qwen2", hf_config={"max_offset": 3, "mtp_loss_weight": 0.5}, draft_len=4)
    assert cfg.max_offset == 3 and cfg.mtp_loss_weight == 0.5 and cfg.draft_len == 4
    cfg.save(tmp_path)
    d = json.loads((tmp_path / CONFIG_FILE).read_text())
    for key in ("compression_ratio", "max_offset", "draft_len", "max_memory_tokens",
                "lm_loss_weight", "mtp_loss_weight", "template", "token_ids"):
        assert key in d
    assert set(d["token_ids"]) == {"splitter", "continue", "foresight", "memory", "eos", "bos"}
    again = MemoSightConfig.load(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert MemoSightConfig.load(tmp_path / "nowhere") is None


def test_plain_tokenizer_without_memosight_tokens_is_an_error():
    tok = make_bpe_tokenizer()
    assert not has_memosight_tokens(tok)
    with pytest.raises(ConfigError, match="no MemoSight tokens"):
        build_config(tok, "qwen2")


@pytest.mark.parametrize(
    "content, message",
    [
        ("{", "not valid JSON"),
        ('{"template": "qwen", "compression_ratio": 6}', "missing key 'token_ids'"),
        ('{"template": "nope", "compression_ratio": 6, "token_ids": {}}', "missing the key"),
    ],
)
def test_bad_memosight_json_names_the_file(tmp_path, content, message):
    (tmp_path / CONFIG_FILE).write_text(content)
    with pytest.raises(ConfigError, match=message) as e:
        MemoSightConfig.load(tmp_path)
    assert CONFIG_FILE in str(e.value)


def test_unsupported_family():
    with pytest.raises(ConfigError, match="supported: qwen2, llama"):
        build_config(make_bpe_tokenizer(), "gpt2")


def test_memory_count():
    assert memory_count(1, 6) == 1
    assert memory_count(6, 6) == 1
    assert memory_count(7, 6) == 2
    assert memory_count(10_000, 1) == 300
