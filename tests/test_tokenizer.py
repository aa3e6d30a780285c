"""ChatTokenizer against the real Qwen tokenizer.json and transformers' own chat templating."""
import hashlib
import json
import os
import random

import pytest

from skyt1.tokenizer import (ENDOFTEXT, IM_END, IM_START, QWEN25_DEFAULT_SYSTEM, ChatTokenizer,
                             messages_from_row)

# Qwen2.5-Instruct's chat template (the "chat_template" of Qwen/Qwen2.5-*-Instruct's tokenizer_config.json),
# verbatim: tools in the system turn, assistant tool_calls, tool turns.
QWEN25_TEMPLATE = r'''{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
'''

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
    with pytest.raises(ValueError, match=r"messages\[0\].content must be a string"):
        tok.encode_chat([{"role": "user", "content": 3}])
    with pytest.raises(ValueError, match=r"messages\[0\].tool_calls: only an assistant turn calls tools"):
        tok.encode_chat([{"role": "user", "content": "q", "tool_calls": []}])
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\]: expected"):
        tok.encode_chat([good, {"role": "assistant", "content": None, "tool_calls": [{"function": {"name": 1}}]}])
    with pytest.raises(ValueError, match=r"messages\[1\].tool_calls\[0\].arguments: not JSON-serialisable"):
        tok.encode_chat([good, {"role": "assistant", "content": "", "tool_calls": [
            {"function": {"name": "f", "arguments": {"x": object()}}}]}])
    with pytest.raises(ValueError, match=r"messages\[1\].content must be a string"):
        tok.encode_chat([good, {"role": "assistant", "content": None}])  # None only beside tool_calls
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
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"},
                   {"role": "tool", "content": "R"}]},
     r"row 7: key 'messages\[2\]': expected a user turn here, got tool"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": None, "tool_calls": [
        {"function": {"name": "f", "arguments": "{}"}}]}, {"role": "assistant", "content": "A"}]},
     r"row 7: key 'messages\[2\]': expected a tool turn here, got assistant"),
    ({"messages": [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "tool_calls": [
        {"type": "function"}]}]}, r"row 7: key 'messages\[1\].tool_calls\[0\]': expected"),
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
    ({"messages": [{"role": "tool", "content": "Q"}]}, r"row 7: key 'messages\[0\]': expected a user turn here, got tool"),
    ({"messages": [{"role": "function", "content": "Q"}]}, r"row 7: key 'messages\[0\].role': unknown role 'function'"),
    ({"prompt": "Q"}, r"row 7: neither 'conversations'"),
    (["Q", "A"], r"row 7: expected a JSON object, got list"),
])
def test_row_errors(row, match):
    with pytest.raises(ValueError, match=match):
        messages_from_row(row, "data.jsonl", 7)


def _tool_conversations(rng):
    q, q2 = _rand_text(rng, 12), _rand_text(rng, 8)
    a, a2 = _rand_text(rng, 20, lead_ok=False), _rand_text(rng, 15, lead_ok=False)
    weather = {"type": "function", "function": {"name": "get_weather",
                                                "arguments": {"city": "Zürich", "unit": "°C", "days": [1, 2]}}}
    clock = {"function": {"name": "now", "arguments": "{\"tz\": \"UTC\"}"}}  # OpenAI's arguments: a JSON string
    return {
        "system later": [{"role": "user", "content": q}, {"role": "assistant", "content": a},
                         {"role": "system", "content": "Now answer briefly."}, {"role": "user", "content": q2},
                         {"role": "assistant", "content": a2}],
        "tool calls": [{"role": "system", "content": "Use tools."}, {"role": "user", "content": q},
                       {"role": "assistant", "content": None, "tool_calls": [weather, clock]},
                       {"role": "tool", "content": _rand_text(rng, 6)}, {"role": "tool", "content": "12:00"},
                       {"role": "assistant", "content": a}],
        "content and calls": [{"role": "user", "content": q},
                              {"role": "assistant", "content": a, "tool_calls": [{"name": "f", "arguments": {}}]},
                              {"role": "tool", "content": _rand_text(rng, 6)},
                              {"role": "assistant", "content": a2}],
        "empty assistant": [{"role": "user", "content": q}, {"role": "assistant", "content": ""},
                            {"role": "user", "content": q2}, {"role": "assistant", "content": a2}],
    }


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city, °C or °F",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]


@pytest.mark.parametrize("name", ["system later", "tool calls", "content and calls", "empty assistant"])
@pytest.mark.parametrize("tools", [None, [], TOOLS], ids=["no-tools", "empty-tools", "tools"])
def test_qwen25_template_tools_system_and_empty_turns(tok, hf_tok, rng, name, tools):
    msgs = _tool_conversations(rng)[name]
    ref = hf_tok.apply_chat_template(msgs, chat_template=QWEN25_TEMPLATE, tools=tools, tokenize=False)
    ours = tok.render_chat(msgs, tools=tools)
    assert ours + "\n" == ref  # the last turn's "<|im_end|>\n": the "\n" is never trained on
    ids, mask = tok.encode_chat(msgs, tools=tools)
    assert ids == hf_tok(ref, add_special_tokens=False)["input_ids"][:-1]
    # Loss only on what the assistant writes: each assistant turn's content, tool calls and end token.
    want = []
    for m in msgs:
        if m["role"] == "assistant":
            calls = "".join('\n<tool_call>\n{"name": "%s", "arguments": %s}\n</tool_call>' % (
                c.get("function", c)["name"], json.dumps(c.get("function", c)["arguments"], ensure_ascii=False))
                for c in m.get("tool_calls") or [])
            body = (m["content"] or "") + calls
            want.append((body[1:] if not m["content"] and calls else body) + IM_END)
    assert [tok.decode(ids[b:e]) for b, e in _spans(mask)] == want
    assert not any("tool_response" in tok.decode(ids[b:e]) for b, e in _spans(mask))
    # Generation prompts after every user or tool turn, as the template's add_generation_prompt renders them.
    for k in range(1, len(msgs)):
        if msgs[k]["role"] == "assistant" and msgs[k - 1]["role"] in ("user", "tool"):
            prompt = hf_tok.apply_chat_template(msgs[:k], chat_template=QWEN25_TEMPLATE, tools=tools,
                                                tokenize=False, add_generation_prompt=True)
            assert tok.render_prompt(msgs[:k], tools=tools) == prompt
            assert tok.encode_prompt(msgs[:k], tools=tools) == hf_tok(prompt, add_special_tokens=False)["input_ids"]


def test_empty_assistant_turn_trains_only_its_end_token(tok):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]
    ids, mask = tok.encode_chat(msgs)
    assert ids[-1] == tok.im_end_id and mask[-1] and sum(mask) == 1
    assert tok.decode(ids[-3:-1]) == "assistant\n"


def test_rows_with_tool_calls_later_system_and_empty_turns(tok):
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{\"x\": 1}"}}
    row = {"messages": [{"role": "user", "content": "Q"},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "tool", "content": "R1"}, {"role": "tool", "content": "R2"},
                        {"role": "assistant", "content": "A"}, {"role": "system", "content": "S2"},
                        {"role": "user", "content": "Q2"}, {"role": "assistant", "content": ""}]}
    msgs = messages_from_row(row, "f.jsonl", 0)
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [call]}
    assert [m["role"] for m in msgs] == ["user", "assistant", "tool", "tool", "assistant", "system", "user",
                                         "assistant"]
    assert tok.render_chat(msgs).endswith(
        '<|im_start|>assistant\n<tool_call>\n{"name": "f", "arguments": "{\\"x\\": 1}"}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nR1\n</tool_response>\n<tool_response>\nR2\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\nA<|im_end|>\n<|im_start|>system\nS2<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>")
