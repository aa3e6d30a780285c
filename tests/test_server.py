"""The OpenAI-compatible server, driven by the official `openai` client on 127.0.0.1 (ephemeral port)."""
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import torch

from skyt1.config import ModelConfig
from skyt1.model import build_model
from skyt1.sample import LLM, SamplingParams
from skyt1.sample.server import build_server, stop_server

openai = pytest.importorskip("openai")

MAX_LEN = 192


@contextlib.contextmanager
def serving(tok_dir, config=None, max_num_seqs=8):
    """(ref, port, engine): a tiny random model with the tiny BPE tokenizer, served from a background thread;
    ref is a second LLM over the same weights for expected outputs (the served engine belongs to its thread).
    Also used by the other server test files, with their own limits."""
    from skyt1.data.synthetic import build_tiny_tokenizer
    from skyt1.tokenizer import ChatTokenizer

    torch.set_num_threads(1)
    tok = ChatTokenizer.from_pretrained(build_tiny_tokenizer(tok_dir))
    cfg = ModelConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=MAX_LEN)
    model = build_model(cfg)
    model.init_weights(torch.randint(0, 2**31 - 1, ()).item(), std=0.2)
    llm = LLM(model.eval(), tok, num_kv_blocks=128, block_size=8, max_num_seqs=max_num_seqs)
    server = build_server(llm.engine, "127.0.0.1", 0, "tiny", config)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    ref = LLM(model, tok, num_kv_blocks=128, block_size=8, max_num_seqs=max_num_seqs)
    try:
        yield ref, server.server_address[1], llm.engine
    finally:
        stop_server(server)
        thread.join(timeout=10)
        assert not thread.is_alive()


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    with serving(tmp_path_factory.mktemp("tok")) as s:
        yield s


def client(port):
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_chat(served):
    llm, port, engine = served
    c = client(port)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 3 + 4?"}]
    r = c.chat.completions.create(model="any-name", messages=msgs, max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.model == "any-name"
    ids = llm.tokenizer.encode_prompt(msgs)
    want = llm.generate([ids], SamplingParams(temperature=0, max_tokens=12))[0]
    assert r.choices[0].message.content == want.outputs[0].text
    assert r.choices[0].finish_reason == want.outputs[0].finish_reason
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(want.outputs[0].token_ids)


def test_completion_with_logprobs_and_n(served):
    llm, port, engine = served
    r = client(port).completions.create(model="m", prompt=["12 + 3 =", "Hello"], max_tokens=6, temperature=0.9,
                                        seed=3, n=2, logprobs=2, extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    want = llm.generate(["12 + 3 =", "Hello"], SamplingParams(temperature=0.9, seed=3, n=2, max_tokens=6,
                                                              ignore_eos=True))
    texts = [c.text for o in want for c in o.outputs]
    assert [c.text for c in r.choices] == texts
    for c in r.choices:
        # top_logprobs maps token text -> logprob for the sampled token and the top 2 (vLLM / OpenAI): two
        # byte-piece tokens may both read "\ufffd" and merge
        assert len(c.logprobs.tokens) == 6 and 1 <= len(c.logprobs.top_logprobs[0]) <= 3
        assert all(c.logprobs.tokens[j] in c.logprobs.top_logprobs[j] for j in range(6))
        assert all(lp <= 0 for lp in c.logprobs.token_logprobs)
    assert r.usage.completion_tokens == 4 * 6


def test_streaming_chat_and_completion(served):
    llm, port, engine = served
    c = client(port)
    msgs = [{"role": "user", "content": "Count: 1 2 3"}]
    want = llm.generate([llm.tokenizer.encode_prompt(msgs)], SamplingParams(temperature=0, max_tokens=20))[0].outputs[0]
    chunks = list(c.chat.completions.create(model="m", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == want.text
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == want.finish_reason
    assert chunks[-1].usage.completion_tokens == len(want.token_ids)
    stream = c.completions.create(model="m", prompt="Count: 1 2 3", max_tokens=15, temperature=0, stream=True,
                                  stop=["3"])
    got = "".join(ch.choices[0].text for ch in stream)
    ref = llm.generate(["Count: 1 2 3"], SamplingParams(temperature=0, max_tokens=15, stop=["3"]))[0].outputs[0]
    assert got == ref.text


def test_two_concurrent_clients(served):
    llm, port, engine = served
    prompts = ["What is 10 + 20?", "Tell me 5 - 2."]
    results = {}

    def ask(i):
        r = client(port).chat.completions.create(model="m", messages=[{"role": "user", "content": prompts[i]}],
                                                 max_tokens=30, temperature=0, extra_body={"ignore_eos": True})
        results[i] = r.choices[0].message.content

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    want = llm.generate([llm.tokenizer.encode_prompt([{"role": "user", "content": p}]) for p in prompts],
                        SamplingParams(temperature=0, max_tokens=30, ignore_eos=True))
    assert results == {i: w.outputs[0].text for i, w in enumerate(want)}


def raw_post(port, path, body: bytes):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    conn.close()
    return resp.status, data


def test_bad_requests_get_400(served):
    llm, port, engine = served
    c = client(port)
    status, data = raw_post(port, "/v1/chat/completions", b"{not json")
    assert status == 400 and "not valid JSON" in data["error"]["message"]
    status, data = raw_post(port, "/v1/completions", json.dumps({"model": "m"}).encode())
    assert status == 400 and data["error"]["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=MAX_LEN)
    assert e.value.status_code == 400 and "context length" in str(e.value)
    with pytest.raises(openai.BadRequestError):
        c.chat.completions.create(model="m", messages=[{"role": "robot", "content": "hi"}], max_tokens=5)
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model="m", prompt="hi", max_tokens=5, temperature=-1)
    with pytest.raises(openai.NotFoundError):
        c.embeddings.create(model="m", input="hi")
    # the server still serves after all that
    assert c.completions.create(model="m", prompt="hi", max_tokens=2).usage.completion_tokens >= 1


def test_client_disconnect_mid_stream(served):
    llm, port, engine = served
    aborted = []
    real_abort = engine.abort

    def spy(request_id):
        aborted.append((request_id, request_id in engine.requests))  # was it still running?
        real_abort(request_id)

    engine.abort = spy
    try:
        body = json.dumps({"model": "m", "messages": [{"role": "user", "content": "go"}], "stream": True,
                           "max_tokens": 120, "ignore_eos": True, "temperature": 0}).encode()
        sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        got = b""
        while got.count(b"data: ") < 3:  # the stream has started
            data = sock.recv(4096)
            assert data and b" 200 OK" in got + data, got + data
            got += data
        sock.close()
        # another client is served in full meanwhile
        r = client(port).completions.create(model="m", prompt="1 + 1 =", max_tokens=40, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == 40
        deadline = time.monotonic() + 30
        while not aborted and time.monotonic() < deadline:
            time.sleep(0.05)
        assert aborted and aborted[0][0].startswith("chatcmpl-") and aborted[0][1]
        while engine.has_unfinished() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not engine.has_unfinished()
        assert engine.block_manager.num_free == engine.block_manager.num_blocks
    finally:
        engine.abort = real_abort
