"""ChatTokenizer against the real Qwen tokenizer.json and transformers' own chat templating."""
import hashlib
import os
import random

import pytest

from skyt1.tokenizer import (ENDOFTEXT, IM_END, IM_START, QWEN25_DEFAULT_SYSTEM, ChatTokenizer,
                             messages_from_row)

# Qwen2.5-Instruct's chat template (tokenizer_config.json), the branch without tools, verbatim.
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == \"user\") or (message.role == \"system\" and not loop.first) or "
    "(message.role == \"assistant\" and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- endif %}"
)

_WORDS = ["the", "Return", "\\boxed{42}", "x^2", "  ", "\n", "\n\n", "é", "数学", "😀", "<|begin_of_thought|>",
          "def f(x):", "\t", " ", "123456", "'s", "...", "<think>", "Ġ", "\r\n"]


def _rand_text(rng: random.Random, n: int, lead_ok: bool = True) -> str:
    words = [rng.choice(_WORDS) for _ in range(n)]
    s = "".join(w if rng.random() < 0.3 else " " + w for w in words)
    if not lead_ok:  # content must not begin with whitespace that merges with the header's "\n"
        s = "A" + s
    return s


@pytest.fixture(scope="module")
def tok(qwen_tokenizer_dir):
    return ChatTokenizer.from_pretrained(qwen_tokenizer_dir)


@pytest.fixture(scope="module")
def hf_tok(qwen_tokenizer_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(tokenizer_file=str(qwen_tokenizer_dir / "tokenizer.json"))


@pytest.fixture
def rng():
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"seed {seed}")
    return random.Random(seed)


def _spans(mask):
    """Maximal runs of True as (start, stop)."""
    out, start = [], None
    for i, m in enumerate(list(mask) + [False]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            out.append((start, i))
            start = None
    return out


def test_load_folder_file_and_metadata(qwen_tokenizer_dir, tok):
    file = qwen_tokenizer_dir / "tokenizer.json"
    t2 = ChatTokenizer.from_pretrained(file, end_token="endoftext")
    assert tok.hash == t2.hash == hashlib.sha256(file.read_bytes()).hexdigest()
    assert tok.eos_token_ids == (151645, 151643)
    assert tok.pad_id == 151643
    assert tok.token_id(IM_START) == 151644 and tok.token_id(IM_END) == 151645 and tok.token_id(ENDOFTEXT) == 151643
    assert tok.end_token_id == 151645 and t2.end_token_id == 151643
    assert tok.vocab_size >= 151646
    with pytest.raises(KeyError, match="no token"):
        tok.token_id("<|no_such_token|>")


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        ChatTokenizer.from_pretrained(tmp_path / "missing")
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json: not a valid tokenizer.json"):
        ChatTokenizer.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="end_token"):
        ChatTokenizer.from_pretrained(tmp_path, end_token="eos")


def test_tokenizer_without_chatml_tokens(tmp_path):
    from tokenizers import Tokenizer, models
    Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(ValueError, match=r"has no token\(s\)"):
        ChatTokenizer.from_pretrained(tmp_path)


@pytest.mark.parametrize("end_token", ["im_end", "endoftext"])
def test_single_turn_equals_handwritten_chatml(qwen_tokenizer_dir, hf_tok, rng, end_token):
    tok = ChatTokenizer.from_pretrained(qwen_tokenizer_dir, end_token=end_token)
    end = IM_END if end_token == "im_end" else ENDOFTEXT
    s, q, a = _rand_text(rng, 20), _rand_text(rng, 30), _rand_text(rng, 60, lead_ok=False)
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, mask = tok.encode_chat(msgs, system=s)
    text = f"<|im_start|>system\n{s}<|im_end|>\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}{end}"
    assert tok.render_chat(msgs, system=s) == text
    assert ids == tok.encode(text)
    assert ids == hf_tok(text, add_special_tokens=False)["input_ids"]  # oracle: HF tokenizes the string whole
    assert len(mask) == len(ids)
    (start, stop), = _spans(mask)
    assert stop == len(ids) and ids[-1] == tok.end_token_id
    assert tok.decode(ids[start:]) == a + end
    assert tok.decode(ids[:start]).endswith("<|im_start|>assistant\n")


@pytest.mark.parametrize("end_token", ["im_end", "endoftext"])
def test_multi_turn(qwen_tokenizer_dir, rng, end_token):
    tok = ChatTokenizer.from_pretrained(qwen_tokenizer_dir, end_token=end_token)
    end = IM_END if end_token == "im_end" else ENDOFTEXT
    turns = [(_rand_text(rng, 10), _rand_text(rng, 25, lead_ok=False)) for _ in range(3)]
    msgs = [m for q, a in turns for m in ({"role": "user", "content": q}, {"role": "assistant", "content": a})]
    ids, mask = tok.encode_chat(msgs)
    text = f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n"
    text += "\n".join(f"<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{a}{end}" for q, a in turns)
    assert ids == tok.encode(text)
    spans = _spans(mask)
    assert [tok.decode(ids[b:e]) for b, e in spans] == [a + end for _, a in turns]
    for b, e in spans[:-1]:
        assert tok.decode([ids[e]]) == "\n" and not mask[e]  # the separator after an end token is not trained


def test_boundary_whitespace_matches_whole_string(tok, rng):
    # Content that begins with newlines merges with the header's "\n" into one BPE token; ids must still equal
    # the whole-string tokenization and that token counts as content.
    cases = [("\n\nHello", True), (" \n x", True), ("\n", True), ("\t\tcode", False), (" code", False),
             (_rand_text(rng, 40, lead_ok=False), False)]
    for a, straddles in cases:
        msgs = [{"role": "user", "content": _rand_text(rng, 5)}, {"role": "assistant", "content": a + "."}]
        ids, mask = tok.encode_chat(msgs, system="")
        assert ids == tok.encode(tok.render_chat(msgs, system="")), repr(a)
        (start, stop), = _spans(mask)
        assert tok.decode(ids[start:]).endswith(a + "." + IM_END)
        header = tok.decode(ids[:start]).rsplit(IM_START, 1)[1]
        assert header == ("assistant" if straddles else "assistant\n"), repr(a)


def test_special_tokens_in_content_are_parsed_like_hf(tok, hf_tok):
    q = "What does <|im_end|> mean? <think>x</think> <|endoftext|>"
    a = "It ends a turn: <|im_end|>, see <|im_start|>."
    msgs = [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    ids, mask = tok.encode_chat(msgs)
    assert ids == hf_tok(tok.render_chat(msgs), add_special_tokens=False)["input_ids"]
    assert ids.count(tok.im_end_id) == 5  # system end, user content, user end, assistant content, turn end
    (start, _), = _spans(mask)
    assert tok.decode(ids[start:]) == a + IM_END


@pytest.mark.parametrize("end_token", ["im_end", "endoftext"])
def test_matches_transformers_qwen25_template(qwen_tokenizer_dir, hf_tok, rng, end_token):
    tok = ChatTokenizer.from_pretrained(qwen_tokenizer_dir, end_token=end_token)
    q, a = _rand_text(rng, 20), _rand_text(rng, 40, lead_ok=False)
    for msgs in ([{"role": "user", "content": q}, {"role": "assistant", "content": a}],
                 [{"role": "system", "content": "Think step by step."}, {"role": "user", "content": q},
                  {"role": "assistant", "content": a}]):
        ref = hf_tok.apply_chat_template(msgs, chat_template=QWEN25_TEMPLATE, tokenize=False)
        ours = tok.render_chat(msgs)
        if end_token == "im_end":
            # Qwen's template closes the last turn with "<|im_end|>\n"; the "\n" is never trained on.
            assert ours + "\n" == ref
        else:
            assert ours[: -len(ENDOFTEXT)] + IM_END + "\n" == ref
        prompt = hf_tok.apply_chat_template(msgs[:-1], chat_template=QWEN25_TEMPLATE, tokenize=False,
                                            add_generation_prompt=True)
        assert tok.render_prompt(msgs[:-1]) == prompt
        assert tok.encode_prompt(msgs[:-1]) == hf_tok(prompt, add_special_tokens=False)["input_ids"]


def test_system_prompt_options(qwen_tokenizer_dir, tok):
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert tok.render_chat(msgs).startswith(f"<|im_start|>system\n{QWEN25_DEFAULT_SYSTEM}<|im_end|>\n")
    assert tok.render_chat(msgs, system="S").startswith("<|im_start|>system\nS<|im_end|>\n<|im_start|>user")
    assert tok.render_chat([{"role": "system", "content": "T"}] + msgs).startswith("<|im_start|>system\nT<|im_end|>")
    bare = ChatTokenizer.from_pretrained(qwen_tokenizer_dir, default_system=None)
    text = bare.render_chat(msgs)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>"
    assert bare.encode_chat(msgs)[0] == bare.encode(text)
    assert bare.render_prompt(msgs[:1]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    with pytest.raises(ValueError, match="both"):
        tok.encode_chat([{"role": "system", "content": "T"}] + msgs, system="S")


def test_encode_chat_rejects_bad_messages(tok):
    good = {"role": "user", "content": "q"}
    with pytest.raises(ValueError, match=r"messages\[1\].role: unknown role 'bot'"):
        tok.encode_chat([good, {"role": "bot", "content": "x"}])
    with pytest.raises(ValueError, match=r"messages\[1\].content: empty assistant turn"):
        tok.encode_chat([good, {"role": "assistant", "content": "  "}])
    with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
        tok.encode_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match=r"messages\[1\]: a system message may only come first"):
        tok.encode_chat([good, {"role": "system", "content": "x"}])
    with pytest.raises(ValueError, match="last message is an assistant turn"):
        tok.encode_prompt([good, {"role": "assistant", "content": "a"}])


def test_rows_sharegpt_and_openai(tok):
    sky = {"system": "SYS", "conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": "A"}]}
    gpt = {"conversations": [{"from": "system", "value": "SYS"}, {"from": "human", "value": "Q"},
                             {"from": "gpt", "value": "A"}]}
    oai = {"messages": [{"role": "system", "content": "SYS"}, {"role": "user", "content": [
        {"type": "text", "text": "Q"}]}, {"role": "assistant", "content": "A"}]}
    want = [{"role": "system", "content": "SYS"}, {"role": "user", "content": "Q"},
            {"role": "assistant", "content": "A"}]
    for row in (sky, gpt, oai):
        assert messages_from_row(row, "f.json", 0) == want
    # An empty or missing system prompt means the tokenizer's default (LLaMA-Factory's `system or default`).
    assert messages_from_row({"system": "", "conversations": sky["conversations"]}) == want[1:]
    assert messages_from_row({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                             {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c"}]})[0] == \
        {"role": "user", "content": "ab"}
    ids, _ = tok.encode_chat(messages_from_row(sky, "f.json", 0))
    assert ids == tok.encode("<|im_start|>system\nSYS<|im_end|>\n<|im_start|>user\nQ<|im_end|>\n"
                             "<|im_start|>assistant\nA<|im_end|>")
    assert messages_from_row({"messages": [{"role": "user", "content": "Q"}]}, require_assistant=False) == want[1:2]


@pytest.mark.parametrize("row, match", [
    ({"conversations": [{"from": "user", "value": "Q"}, {"from": "bot", "value": "A"}]},
     r"data.jsonl: row 7: key 'conversations\[1\].from': unknown role 'bot'"),
    ({"conversations": [{"from": "user", "value": "Q"}, {"from": "assistant", "value": ""}]},
     r"row 7: key 'conversations\[1\].value': empty assistant turn"),
    ({"conversations": [{"from": "user", "value": "Q"}, {"value": "A"}]},
     r"row 7: key 'conversations\[1\].from': missing"),
    ({"conversations": [{"from": "user", "value": 5}, {"from": "assistant", "value": "A"}]},
     r"row 7: key 'conversations\[0\].value': must be a string"),
    ({"conversations": [{"from": "user", "value": "Q"}]}, r"row 7: key 'conversations': no assistant turn"),
    ({"conversations": [{"from": "user", "value": "Q"}, {"from": "user", "value": "A"}]},
     r"row 7: key 'conversations\[1\]': expected a assistant turn"),
    ({"system": 3, "conversations": []}, r"row 7: key 'system': must be a string"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None}]},
     r"row 7: key 'messages\[1\].content': must be a string or a list"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, {"role": "assistant", "content": "A"}]},
     r"row 7: key 'messages\[0\].content\[0\]': only"),
    ({"messages": [{"role": "tool", "content": "Q"}]}, r"row 7: key 'messages\[0\].role': unknown role 'tool'"),
    ({"prompt": "Q"}, r"row 7: neither 'conversations'"),
    (["Q", "A"], r"row 7: expected a JSON object, got list"),
])
def test_row_errors(row, match):
    with pytest.raises(ValueError, match=match):
        messages_from_row(row, "data.jsonl", 7)
