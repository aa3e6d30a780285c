"""The server's request semantics against OpenAI's and vLLM's documented behaviour, through the official
`openai` client (or raw JSON where the client cannot send the value) on 127.0.0.1: unsupported fields are
refused by name, logprobs shapes, tiny and infinite temperatures, min_tokens, logit_bias, prompt_logprobs,
response_format through xgrammar, and the sampler's vLLM order of min-p and top-p."""
import json

import pytest
import torch

from skyt1.sample import SamplingParams
from skyt1.sample.sequence import Request, Sequence
from test_server import client, raw_post, served  # noqa: F401  (served: the module's own server fixture)

openai = pytest.importorskip("openai")


def completion(port, **body):
    return raw_post(port, "/v1/completions", json.dumps({"model": "m", "prompt": "1 + 2 =", "max_tokens": 3,
                                                          **body}).encode())


def chat(port, **body):
    return raw_post(port, "/v1/chat/completions", json.dumps(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **body}).encode())


@pytest.mark.parametrize("field,value", [
    ("tools", [{"type": "function", "function": {"name": "f", "parameters": {}}}]),
    ("tool_choice", "auto"), ("response_format", {"type": "regex"}),
    ("response_format", {"type": "json_schema", "json_schema": {"name": "x"}}),
    ("echo", True), ("best_of", 3), ("suffix", "!"), ("guided_json", {"type": "object"}),
    ("guided_regex", "a+"), ("structured_outputs", {"regex": "a+"}), ("functions", [{"name": "f"}]),
    ("no_such_field", 1),
])
def test_unsupported_fields_are_refused_by_name(served, field, value):
    llm, port, engine = served
    for send in (completion, chat):
        status, data = send(port, **{field: value})
        assert status == 400, (field, data)
        assert data["error"]["param"] == field and repr(field) in data["error"]["message"]


def test_no_op_values_of_unsupported_fields_pass(served):
    llm, port, engine = served
    for extra in ({"echo": False}, {"best_of": 1}, {"tools": None}, {"response_format": {"type": "text"}},
                  {"logit_bias": {}}, {"user": "someone"}):
        status, data = completion(port, **extra)
        assert status == 200, (extra, data)


def test_lone_surrogate_gets_400(served):
    llm, port, engine = served
    # json.dumps escapes the lone surrogate as \ud800: valid JSON, but not Unicode text
    status, data = completion(port, prompt="ab\ud800cd")
    assert status == 400 and "not valid Unicode" in data["error"]["message"] and data["error"]["param"] == "prompt"
    status, data = chat(port, messages=[{"role": "user", "content": "x\ud800"}])
    assert status == 400 and "messages[0].content" in data["error"]["message"]
    status, data = completion(port, stop=["\udfff"])
    assert status == 400 and data["error"]["param"] == "stop"
    # raw bytes that are not UTF-8 at all
    status, data = raw_post(port, "/v1/completions", b'{"prompt": "\xff\xfe", "max_tokens": 2}')
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    assert completion(port)[0] == 200  # and the server still serves


def test_option_combinations_and_ranges_get_400(served):
    llm, port, engine = served
    c = client(port)
    with pytest.raises(openai.BadRequestError, match="stream_options"):
        c.completions.create(model="m", prompt="hi", max_tokens=2, stream_options={"include_usage": True})
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2,
                                  logprobs=True, top_logprobs=21)
    for seed in (2**63, -2**63 - 1):
        with pytest.raises(openai.BadRequestError, match="seed"):
            c.completions.create(model="m", prompt="hi", max_tokens=2, seed=seed)
    assert completion(port, seed=2**63 - 1)[0] == 200 and completion(port, seed=-2**63)[0] == 200
    with pytest.raises(openai.BadRequestError, match="min_tokens"):
        c.completions.create(model="m", prompt="hi", max_tokens=2, extra_body={"min_tokens": 3})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        c.completions.create(model="m", prompt="hi", max_tokens=2, logit_bias={"5": 101})
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        c.completions.create(model="m", prompt="hi", max_tokens=2, logit_bias={"512": 1})


def test_infinite_temperature_and_penalties_get_400(served):
    llm, port, engine = served
    for field in ("temperature", "repetition_penalty", "presence_penalty", "frequency_penalty", "top_p", "min_p"):
        for literal in ("Infinity", "-Infinity", "NaN", "1e999"):
            body = b'{"prompt": "hi", "max_tokens": 2, "%s": %s}' % (field.encode(), literal.encode())
            status, data = raw_post(port, "/v1/completions", body)
            assert status == 400 and data["error"]["param"] == field, (field, literal, data)
    status, data = completion(port, temperature=10**400)  # an integer beyond float range
    assert status == 400 and data["error"]["param"] == "temperature"


def test_tiny_temperatures_are_greedy(served):
    llm, port, engine = served
    c = client(port)
    greedy = c.completions.create(model="m", prompt="Count: 1 2", max_tokens=10, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert greedy.usage.completion_tokens == 10 and greedy.choices[0].text
    for t in (1e-37, 1e-300, 5e-324, 9.9e-6):
        r = c.completions.create(model="m", prompt="Count: 1 2", max_tokens=10, temperature=t,
                                 extra_body={"ignore_eos": True})
        assert r.choices[0].text == greedy.choices[0].text, t
    assert SamplingParams(temperature=1e-37).greedy and not SamplingParams(temperature=1e-5).greedy


def test_completion_logprobs_include_the_sampled_token(served):
    llm, port, engine = served
    c = client(port)
    r = c.completions.create(model="m", prompt="12 + 3 =", max_tokens=8, temperature=1.0, seed=5, logprobs=0,
                             extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 8
    for tok, tlp, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert top == {tok: tlp}  # logprobs=0: one entry, the sampled token (not {})
    r = c.completions.create(model="m", prompt="12 + 3 =", max_tokens=8, temperature=1.0, seed=5, logprobs=3,
                             extra_body={"ignore_eos": True})
    lp3 = r.choices[0].logprobs
    assert lp3.tokens == lp.tokens  # same seed, same samples
    for tok, tlp, top in zip(lp3.tokens, lp3.token_logprobs, lp3.top_logprobs):
        assert 1 <= len(top) <= 4 and top[tok] == tlp  # k or k + 1 entries (fewer if two texts coincide)
        assert all(v <= 0 for v in top.values())


def test_chat_logprobs_shape_and_true_bytes(served):
    llm, port, engine = served
    tok = llm.tokenizer
    c = client(port)
    # force a first token that is half of a UTF-8 character ("é" is C3 A9) with logit_bias
    half = tok.encode("é")[0]
    assert tok.token_bytes(half) == b"\xc3"
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=6,
                                  temperature=0, logprobs=True, top_logprobs=2, logit_bias={str(half): 100},
                                  extra_body={"ignore_eos": True, "skip_special_tokens": False})
    content = r.choices[0].logprobs.content
    assert len(content) == 6
    assert content[0].bytes == [0xC3] and content[0].token == "\ufffd"  # decoded alone it is U+FFFD
    for e in content:
        assert len(e.top_logprobs) == 2 and e.logprob <= 0
        for t in [e, *e.top_logprobs]:  # whole characters: bytes and text agree
            if "\ufffd" not in t.token:
                assert bytes(t.bytes).decode() == t.token
    # the tokens' bytes put together are the text's bytes, the split character included
    assert bytes(b for e in content for b in e.bytes).decode("utf-8", errors="replace") == r.choices[0].message.content


def test_logit_bias_and_min_tokens(served):
    llm, port, engine = served
    c = client(port)
    first = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))[0].outputs[0]
    # -100 on the greedy first token: greedy picks another one, as the offline engine with the same bias
    r = c.completions.create(model="m", prompt=[5, 6, 7, 8], max_tokens=3, temperature=0,
                             logit_bias={str(first.token_ids[0]): -100}, extra_body={"ignore_eos": True})
    want = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True,
                                                       logit_bias={first.token_ids[0]: -100}))[0].outputs[0]
    assert first.token_ids[0] not in want.token_ids and r.choices[0].text == want.text
    # a stop token id that is the greedy first token ends at once, unless min_tokens holds it off
    stop = first.token_ids[0]
    r = c.completions.create(model="m", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0,
                             extra_body={"stop_token_ids": [stop], "ignore_eos": True})
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == 1
    r = c.completions.create(model="m", prompt=[5, 6, 7, 8], max_tokens=6, temperature=0, logprobs=0,
                             extra_body={"stop_token_ids": [stop], "ignore_eos": True, "min_tokens": 3})
    assert r.usage.completion_tokens >= 3
    want = llm.generate([[5, 6, 7, 8]], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, min_tokens=3,
                                                       stop_token_ids=[stop]))[0].outputs[0]
    assert stop not in want.token_ids[:3] and r.usage.completion_tokens == len(want.token_ids)
    # a stop string is not honoured before min_tokens either (vLLM)
    text = llm.generate(["Count: 1 2"], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))[0].outputs[0]
    stop_str = text.text[:1]
    assert stop_str
    cut = c.completions.create(model="m", prompt="Count: 1 2", max_tokens=8, temperature=0, stop=[stop_str],
                               extra_body={"ignore_eos": True})
    held = c.completions.create(model="m", prompt="Count: 1 2", max_tokens=8, temperature=0, stop=[stop_str],
                                extra_body={"ignore_eos": True, "min_tokens": 4})
    assert cut.choices[0].text == "" and held.usage.completion_tokens >= 4 and len(held.choices[0].text) >= 1


def test_prompt_logprobs_match_a_plain_forward(served):
    llm, port, engine = served
    prompt = torch.randint(3, 512, (9,)).tolist()
    r = client(port).completions.create(model="m", prompt=prompt, max_tokens=2, temperature=0,
                                        extra_body={"prompt_logprobs": 2})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == len(prompt) and plp[0] is None
    model = llm.engine.model
    ids = torch.tensor(prompt)
    with torch.no_grad():
        hidden = model(ids, torch.arange(len(ids)), torch.tensor([0, len(ids)], dtype=torch.int32), len(ids))
        ref = torch.log_softmax(model.logits(hidden).float(), -1)  # (T, V)
    for j in range(1, len(prompt)):
        entry = plp[j]
        row = ref[j - 1]
        mine = entry[str(prompt[j])]
        assert abs(mine["logprob"] - row[prompt[j]].item()) < 1e-4
        assert mine["rank"] == int((row > row[prompt[j]]).sum()) + 1
        top2 = row.topk(2).indices.tolist()
        assert set(entry) == {str(prompt[j]), *map(str, top2)}
        assert all(entry[str(t)]["rank"] == r for r, t in enumerate(top2, 1) if t != prompt[j])
    offline = llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=2))[0].prompt_logprobs
    assert [e and e["token_id"] for e in offline] == [None, *prompt[1:]]
    assert all(abs(e["logprob"] - plp[j][str(e["token_id"])]["logprob"]) < 1e-5 for j, e in enumerate(offline) if e)
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client(port).completions.create(model="m", prompt=prompt, max_tokens=2, extra_body={"prompt_logprobs": 21})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client(port).completions.create(model="m", prompt=prompt, max_tokens=2, stream=True,
                                        extra_body={"prompt_logprobs": 1})
    # chat: vLLM puts them on the response, over the templated prompt
    msgs = [{"role": "user", "content": "hi"}]
    r = client(port).chat.completions.create(model="m", messages=msgs, max_tokens=2, extra_body={"prompt_logprobs": 0})
    plp = r.model_extra["prompt_logprobs"]
    ids = llm.tokenizer.encode_prompt(msgs)
    assert len(plp) == len(ids) and plp[0] is None and all(list(e) == [str(t)] for e, t in zip(plp[1:], ids[1:]))


def test_min_p_before_top_p_as_vllm():
    """probs (0.4, 0.3, 0.2, 0.1), min_p 0.3, top_p 0.75. vLLM applies min-p first: 0.1 goes, the rest
    renormalises to (.444, .333, .222) and top-p keeps two tokens. top-p first would keep three."""
    from skyt1.sample.sampling import Sampler

    V = 8
    logits = torch.full((1, V), -1e9)
    logits[0, :4] = torch.tensor([0.4, 0.3, 0.2, 0.1]).log()
    sampler = Sampler(V, torch.device("cpu"), seed=int(torch.randint(0, 2**31 - 1, ())))
    req = Request("r", [1], SamplingParams())
    seq = Sequence(0, req, 0, SamplingParams(temperature=1.0, min_p=0.3, top_p=0.75), frozenset(), None, None)
    draws = {sampler(logits, [seq]).token_ids.item() for _ in range(300)}
    assert draws == {0, 1}


def test_tiny_temperature_in_the_sampler_is_argmax():
    from skyt1.sample.sampling import Sampler

    V = 50
    logits = torch.randn(3, V) * 5
    sampler = Sampler(V, torch.device("cpu"), seed=0)
    req = Request("r", [1], SamplingParams())
    seqs = [Sequence(i, req, i, SamplingParams(temperature=t), frozenset(), None, None)
            for i, t in enumerate((1e-37, 1e-300, 1.0))]
    ids = sampler(logits, seqs).token_ids
    assert ids[:2].tolist() == logits[:2].argmax(-1).tolist()


def test_generate_failing_on_one_prompt_leaves_nothing_queued(served):
    llm, port, engine = served
    with pytest.raises(ValueError, match="out of range"):
        llm.generate([[5, 6, 7], [8, 9, 10], [1, 512]], SamplingParams(temperature=0, max_tokens=4))
    assert not llm.engine.has_unfinished() and not llm.engine.requests
    assert llm.engine.block_manager.num_free == llm.engine.block_manager.num_blocks
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    assert len(out) == 1 and len(out[0].outputs[0].token_ids) == 4


def _whitespace_bias(tok) -> dict:
    """-100 on every whitespace-only token: JSON allows any amount of it, and a random model would pad."""
    return {str(i): -100 for i in range(tok.vocab_size)
            if i not in tok.added_token_ids and not tok.token_bytes(i).strip()}


def test_response_format_json_schema_and_json_object(served):
    llm, port, engine = served
    tok = llm.tokenizer
    c = client(port)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
              "additionalProperties": False}
    r = c.chat.completions.create(model="m", messages=[{"role": "user", "content": "ok?"}], max_tokens=60, n=3,
                                  temperature=1.0, seed=int(torch.randint(0, 2**31 - 1, ())),
                                  logit_bias=_whitespace_bias(tok),
                                  response_format={"type": "json_schema", "json_schema": {"name": "v", "schema": schema}})
    for ch in r.choices:
        assert ch.finish_reason == "stop" and json.loads(ch.message.content) in ({"ok": True}, {"ok": False})
    # json_object: steer the random model to "{" then "}" and the grammar must end the sample right there
    bias = {**_whitespace_bias(tok), str(tok.encode("{")[0]): 30, str(tok.encode("}")[0]): 30}
    r = c.completions.create(model="m", prompt="JSON:", max_tokens=40, temperature=0, logit_bias=bias,
                             extra_body={"response_format": {"type": "json_object"}}, stream=True)
    chunks = list(r)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert isinstance(json.loads("".join(ch.choices[0].text for ch in chunks)), dict)
