"""Training data: records, samples, buckets and batches."""

import json

import numpy as np
import pytest

from helpers import make_bpe_tokenizer, random_steps, spec_token_ids
from mlx_memosight.config import TEMPLATES, MemoSightConfig, add_memosight_tokens, build_config
from mlx_memosight.datasets import (
    BatchIterator,
    DataError,
    Example,
    MemoSightDataset,
    batch_arrays,
    bucket_length,
    load_splits,
    num_targets,
    parse_record,
    read_jsonl,
    split_steps,
)
from mlx_memosight.layout import Role, build_training_sample, encode_steps

IDS = spec_token_ids()


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_bpe_tokenizer()
    add_memosight_tokens(tok)
    return tok


@pytest.fixture(scope="module")
def cfg(tokenizer):
    return build_config(tokenizer, "qwen2", compression_ratio=3, max_offset=2)


def write(path, lines):
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def test_split_steps_follows_the_reference_regex():
    assert split_steps("a\n\nb\n \t\nc\n\n\n\nd") == ["a", "b", "c", "d"]
    assert split_steps("\n\n x \n y\n\n") == ["x \n y"]
    assert split_steps("one") == ["one"]


def test_record_formats():
    ref = parse_record(
        {"question": "Q", "system_prompt": "S", "system_list": [], "question_list": [],
         "thoughts_list": ["t1", "t2"], "gt_output": "ignored\n\nhere", "add_eos": False}, "f:1")
    assert (ref.question, ref.system, ref.thoughts, ref.add_eos) == ("Q", "S", ["t1", "t2"], False)
    light = parse_record({"question": "Q", "gt_output": "a\n\nb"}, "f:2")
    assert (light.system, light.thoughts, light.add_eos) == (None, ["a", "b"], True)
    chat = parse_record({"messages": [
        {"role": "user", "content": "Q"}, {"role": "assistant", "content": "x\n\ny"}]}, "f:3")
    assert (chat.question, chat.system, chat.thoughts) == ("Q", None, ["x", "y"])
    chat = parse_record({"messages": [
        {"role": "system", "content": "S"}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "x"}]}, "f:4")
    assert chat.system == "S"


# Records shaped as the reasoning data sets users fine-tune on: Bespoke-Stratos-17k
# (ShareGPT "conversations", the reference's thought / solution markup) and
# R1-style chat records with a <think> block, written here from their published formats.
BESPOKE = {
    "system": "Your role as an assistant involves thoroughly exploring questions ...",
    "conversations": [
        {"from": "user", "value": "Return your final response within \\boxed{}. What is 3 + 4?"},
        {"from": "assistant", "value": "<|begin_of_thought|>\n\nOkay, I need 3 + 4.\n\n"
                                       "Adding gives 7.\n\n<|end_of_thought|>\n\n<|begin_of_solution|>\n\n"
                                       "3 + 4 = 7, so the answer is \\boxed{7}.\n\n<|end_of_solution|>"},
    ],
}
R1 = {"messages": [
    {"role": "user", "content": "What is 12 * 5?"},
    {"role": "assistant", "content": "<think>\nTwelve times five.\n\n12 * 5 = 60.\n</think>\n\n"
                                     "The product is 60.\n\n**Answer:** \\boxed{60}"},
]}
R1_SPACED = {"messages": [
    {"role": "user", "content": "Q"},
    {"role": "assistant", "content": "<think>\n\nFirst.\n\nSecond.\n\n</think>\n\nAnswer."},
]}


def test_reasoning_data_set_records():
    """A thinking block's steps are split inside it, its markers join the steps
    they open and close, and the answer after it is split into steps too."""
    b = parse_record(BESPOKE, "f:1")
    assert b.system.startswith("Your role") and b.question.endswith("What is 3 + 4?")
    assert b.thoughts == ["<|begin_of_thought|>\nOkay, I need 3 + 4.", "Adding gives 7.\n<|end_of_thought|>",
                          "<|begin_of_solution|>\n3 + 4 = 7, so the answer is \\boxed{7}.\n<|end_of_solution|>"]
    r1 = parse_record(R1, "f:2")
    assert r1.thoughts == ["<think>\nTwelve times five.", "12 * 5 = 60.\n</think>", "The product is 60.",
                           "**Answer:** \\boxed{60}"]
    assert parse_record(R1_SPACED, "f:3").thoughts == ["<think>\nFirst.", "Second.\n</think>", "Answer."]
    with pytest.raises(DataError, match="f:4: conversations\\[0\\].from must be one of"):
        parse_record({"conversations": [{"from": "bot", "value": "x"}]}, "f:4")


@pytest.mark.parametrize("record, message", [
    ({"gt_output": "a"}, "f:7: missing field 'question'"),
    ({"question": "Q"}, "f:7: missing field 'thoughts_list' or 'gt_output'"),
    ({"question": "Q", "thoughts_list": "a"}, "f:7: field 'thoughts_list' must be a list of strings"),
    ({"question": 3, "gt_output": "a"}, "f:7: field 'question' must be a string"),
    ({"question": "Q", "gt_output": " \n\n "}, "f:7: field 'gt_output' is empty"),
    ({"question": "Q", "gt_output": "a", "add_eos": "yes"}, "f:7: field 'add_eos' must be true or false"),
    ({"messages": [{"role": "user", "content": "Q"}]}, "f:7: field 'messages' must hold"),
    ([1, 2], "f:7: expected a JSON object"),
])
def test_bad_records_name_the_line_and_field(record, message):
    with pytest.raises(DataError) as e:
        parse_record(record, "f:7")
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_malformed_lines_stop_or_are_skipped_and_counted(tmp_path):
    good = {"question": "Q", "gt_output": "a\n\nb"}
    path = write(tmp_path / "train.jsonl", [good, '{"question": "Q", ', good, {"question": "Q"}, "", good])
    with pytest.raises(DataError, match=r"train.jsonl:2: not valid JSON"):
        read_jsonl(path)
    examples, skipped = read_jsonl(path, skip_bad_lines=True)
    assert (len(examples), skipped) == (3, 2)


def test_empty_and_missing_data(tmp_path):
    with pytest.raises(DataError, match=r"empty.jsonl: no examples"):
        read_jsonl(write(tmp_path / "empty.jsonl", ["", "  "]))
    with pytest.raises(DataError, match=r"no examples \(1 bad line skipped\)"):
        read_jsonl(write(tmp_path / "bad.jsonl", ["{"]), skip_bad_lines=True)
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match=r"train.jsonl: file not found \(data=.*folder needs train.jsonl\)"):
        load_splits(tmp_path / "folder")
    with pytest.raises(DataError, match=r"data=.*nowhere: no such file or folder"):
        load_splits(tmp_path / "nowhere")
    write(tmp_path / "folder" / "train.jsonl", [{"question": "Q", "gt_output": "a"}])
    write(tmp_path / "folder" / "valid.jsonl", [{"question": "Q", "gt_output": "b"}])
    assert sorted(load_splits(tmp_path / "folder")) == ["train", "valid"]


def test_dataset_samples_follow_the_layout(tokenizer, cfg):
    examples = [Example("What is 3 + 4?", ["3 + 4 = 7.", "The answer is 7."], system="Be brief.")] * 5
    ds = MemoSightDataset.from_examples(examples, tokenizer, cfg, seed=3)
    offsets = [s.offset for s in ds.samples]
    again = MemoSightDataset.from_examples(examples, tokenizer, cfg, seed=3)
    assert offsets == [s.offset for s in again.samples]  # fixed for a seed (and across epochs)
    assert set(offsets) <= {0, 1, 2} and len(set(offsets)) > 1
    s = ds.samples[0]
    prompt = tokenizer.encode(cfg.template.render("What is 3 + 4?", "Be brief."), add_special_tokens=False)
    steps, lens = encode_steps(tokenizer, examples[0].thoughts)
    expected = build_training_sample(prompt, steps, cfg.token_ids, 3, s.offset, thought_lens=lens)
    np.testing.assert_array_equal(s.input_ids, expected.input_ids)
    assert s.input_ids[-1] == cfg.token_ids.eos
    assert tokenizer.decode(prompt).startswith("<|im_start|>system\nBe brief.<|im_end|>")
    no_eos = MemoSightDataset.from_examples([Example("Q", ["a"], add_eos=False)], tokenizer, cfg)
    assert no_eos.samples[0].input_ids[-1] == cfg.token_ids.continue_


def test_truncation_counts_non_foresight_tokens(tokenizer, cfg):
    long = Example("Q", ["word " * 30, "more " * 30], system="S")
    short = Example("Q", ["x"], system="S")
    ds = MemoSightDataset.from_examples([long, short], tokenizer, cfg, max_seq_length=60)
    assert (ds.truncated, ds.dropped) == (1, 0)
    assert ds.samples[0].num_real_tokens == 60 and ds.samples[0].truncated
    tiny = MemoSightDataset.from_examples([long, short], tokenizer, cfg, max_seq_length=5)
    assert tiny.dropped == 2 and len(tiny) == 0  # the prompt alone fills the budget


def test_bucket_lengths():
    assert [bucket_length(n) for n in (1, 32, 33, 256)] == [32, 32, 64, 256]
    lengths = [bucket_length(n) for n in range(1, 20000)]
    assert all(b >= n for n, b in zip(range(1, 20000), lengths))
    assert all(b - n < 32 for n, b in zip(range(1, 257), lengths))
    assert max(b / n for n, b in zip(range(257, 20000), lengths[256:])) <= 1.125 + 1e-9
    assert len(set(lengths)) <= 8 + 8 * 7  # few shapes to compile


def samples_for(n, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        steps, lens = random_steps(rng, int(rng.integers(1, 5)), IDS)
        out.append(build_training_sample([5, 6, 7], steps, IDS, 2, i % 3, thought_lens=lens))
    return out


class Group:
    def __init__(self, rank, size):
        self._rank, self._size = rank, size

    def rank(self):
        return self._rank

    def size(self):
        return self._size


def test_batches_split_a_global_batch_across_processes():
    cfg = MemoSightConfig(token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=2)
    ds = MemoSightDataset(samples_for(12), cfg)
    it = BatchIterator(0.7, 0.3, grad_accumulation_steps=2, seed=4)
    one = it(ds, 4, loop=True)
    two = [it(ds, 4, loop=True, comm_group=Group(r, 2)) for r in range(2)]
    for _ in range(6):
        whole = next(one)
        parts = [next(g) for g in two]
        # each process holds half of the global batch, with the same row weights
        ids = sorted(tuple(np.array(x)[np.array(x) != 0]) for x in np.array(whole[0]))
        got = sorted(tuple(np.array(x)[np.array(x) != 0]) for p in parts for x in np.array(p[0]))
        assert ids == got
        w1 = np.array(whole[7])
        w2 = np.concatenate([np.array(p[7]).ravel() for p in parts])
        # one process: weights sum to (lm_w + mtp_w) * K over a step; two: twice that
        assert np.isclose(w1[w1 > 0].max() * 2, w2[w2 > 0].max())
        assert int(whole[8]) == sum(int(p[8]) for p in parts)


def test_step_weights_normalise_each_stream_over_the_step():
    cfg = MemoSightConfig(token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=2)
    ds = MemoSightDataset(samples_for(8, seed=2), cfg)
    K = 2
    batches = BatchIterator(0.7, 0.3, grad_accumulation_steps=K)(ds, 2, loop=True)
    lm = mtp = 0.0
    for _ in range(K):
        inputs, _, _, _, _, rows, targets, weights, _ = next(batches)[:9]
        rows, weights, inputs = np.array(rows), np.array(weights), np.array(inputs)
        fs = np.take_along_axis(inputs, rows, axis=1) == IDS.foresight
        lm += weights[~fs & (weights > 0)].sum()
        mtp += weights[fs & (weights > 0)].sum()
    # with a cross-entropy of 1 on every row the step loss (mean over the K
    # micro-batches) is lm_w + mtp_w
    assert np.isclose(lm / K, 0.7) and np.isclose(mtp / K, 0.3)


def test_batch_rows_score_every_target_once():
    samples = samples_for(3, seed=7)
    arrays = batch_arrays(samples, 1.0, 2.0)
    rows, targets, weights = (np.array(a) for a in arrays[5:8])
    for i, s in enumerate(samples):
        n_lm, n_mtp = num_targets(s)
        real = weights[i] > 0
        assert real.sum() == n_lm + n_mtp
        r = rows[i][real]
        fs = s.roles[r] == Role.FORESIGHT
        np.testing.assert_array_equal(targets[i][real][fs], s.mtp_targets[r][fs])
        np.testing.assert_array_equal(targets[i][real][~fs], s.lm_targets[r][~fs])
        np.testing.assert_array_equal(weights[i][real], np.where(fs, 2.0, 1.0))
    assert int(arrays[8]) == sum(s.num_real_tokens for s in samples)


def test_batch_size_errors():
    cfg = MemoSightConfig(token_ids=IDS, template=TEMPLATES["qwen"], compression_ratio=2)
    ds = MemoSightDataset(samples_for(3), cfg, name="valid.jsonl")
    with pytest.raises(DataError, match="valid.jsonl: 3 examples, fewer than batch_size=4"):
        next(BatchIterator(0.7, 0.3)(ds, 4))
    with pytest.raises(DataError, match=r"batch_size=3 must be a positive multiple of the number of processes \(2\)"):
        next(BatchIterator(0.7, 0.3)(ds, 3, comm_group=Group(0, 2)))
