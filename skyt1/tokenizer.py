"""Qwen2.5 ChatML formatting over a `tokenizers` tokenizer.json, with an assistant-only loss mask.

The chat format is written here, not read from the tokenizer's chat template, so that training data
is byte-for-byte what we say it is:

    <|im_start|>system\\n{S}<|im_end|>\\n<|im_start|>user\\n{Q}<|im_end|>\\n<|im_start|>assistant\\n{A}{END}

END is configurable:
- "im_end" (default): `<|im_end|>`, Qwen's own chat format. Between turns the end token is followed by
  "\\n", exactly as Qwen2.5's chat template renders it; the last assistant turn stops at `<|im_end|>`
  (the template's trailing "\\n" is not trained on, so it is not emitted).
- "endoftext": `<|endoftext|>` ends every assistant turn instead of `<|im_end|>`, as Sky-T1's
  LLaMA-Factory template did. Multi-turn then reads
  `...assistant\\n{A1}<|endoftext|>\\n<|im_start|>user\\n{Q2}<|im_end|>\\n<|im_start|>assistant\\n{A2}<|endoftext|>`:
  system and user turns still close with `<|im_end|>`, and the "\\n" separator LLaMA-Factory inserts
  before each later user turn follows the `<|endoftext|>`.

The loss mask is True on the tokens of every assistant turn's content and on the token that ends it;
False on "<|im_start|>assistant\\n", on the "\\n" after an end token, and on system/user/tool turns.

Beyond plain turns, conversations render as Qwen2.5's own chat template renders them:
- a system message after the first turn is an ordinary `<|im_start|>system\\n...<|im_end|>` turn;
- an assistant turn with `tool_calls` (OpenAI's {"function": {"name", "arguments"}} or bare {"name",
  "arguments"}) is its content (if any) followed by one
  `\\n<tool_call>\\n{"name": NAME, "arguments": ARGS}\\n</tool_call>` block per call, ARGS as the template's
  `tojson` writes it (json.dumps, ensure_ascii=False: a string of arguments is written as a JSON string);
  the content and the blocks are trained on, as the assistant's output;
- `tool` messages are the template's user turn of `\\n<tool_response>\\n...\\n</tool_response>` blocks, one
  turn for a run of consecutive tool messages; never trained on;
- an empty assistant turn is allowed and trains only its end token;
- tools=[...] (JSON schemas) puts the template's "# Tools" block into the system turn (which then is
  always there: Qwen's default when the conversation brings no system prompt).

Tokenization runs segment by segment (the ChatML special tokens cut the text into segments), which
equals tokenizing the whole ChatML string at once because `tokenizers` itself splits text at added
tokens before any pre-tokenization or BPE. The one boundary not cut by a special token is between
"assistant\\n" and the content: that segment is encoded as one piece and the mask is taken from the
character offsets, so the ids stay identical to whole-string tokenization. A token that straddles the
boundary (content that starts with newlines merges with the header's "\\n", e.g. "\\n\\n\\n") is
counted as content.

Added tokens that occur inside message content (say a literal "<|im_end|>" in a user question) are
parsed as those tokens, as Hugging Face tokenizers do by default (`split_special_tokens=False`) and
therefore as LLaMA-Factory trained Sky-T1.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterable

from tokenizers import Tokenizer

IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
ENDOFTEXT = "<|endoftext|>"
END_TOKENS = {"im_end": IM_END, "endoftext": ENDOFTEXT}
# What Qwen2.5's chat template inserts when a conversation has no system message.
QWEN25_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
ROLES = ("system", "user", "assistant", "tool")

_SHAREGPT_ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "system": "system"}
_OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system", "tool": "tool"}
_ASSISTANT_HEADER = "assistant\n"
# Qwen2.5's chat template, the text it wraps tool signatures in (the "tools" branch of its system turn).
_TOOLS_INTRO = ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
                "You are provided with function signatures within <tools></tools> XML tags:\n<tools>")
_TOOLS_OUTRO = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments "
                "within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, "
                "\"arguments\": <args-json-object>}\n</tool_call>")


def _byte_level_alphabet() -> dict[str, int]:
    """character -> byte of the ByteLevel pre-tokenizer (GPT-2's bytes_to_unicode, inverted): printable
    bytes stand for themselves, the other 68 are shifted to 256 + i."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


_BYTE_OF_CHAR = _byte_level_alphabet()


class ChatTokenizer:
    """A tokenizer.json plus the Qwen2.5 ChatML format and the assistant-only loss mask.

    default_system: the system prompt used when a conversation brings none (Qwen2.5's by default);
    None omits the system turn in that case.
    """

    def __init__(self, tokenizer: Tokenizer, *, end_token: str = "im_end",
                 default_system: str | None = QWEN25_DEFAULT_SYSTEM, path: str = "<memory>", sha256: str = ""):
        if end_token not in END_TOKENS:
            raise ValueError(f"end_token must be one of {sorted(END_TOKENS)}, got {end_token!r}")
        if default_system is not None and not isinstance(default_system, str):
            raise ValueError(f"default_system must be a string or None, got {type(default_system).__name__}")
        self._tok = tokenizer
        self.end_token = end_token
        self.default_system = default_system
        self.path = path
        self.hash = sha256
        missing = [t for t in (IM_START, IM_END, ENDOFTEXT) if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"{path}: tokenizer has no token(s) {missing}; the ChatML format needs "
                             f"{IM_START}, {IM_END} and {ENDOFTEXT}")
        self.im_start_id = tokenizer.token_to_id(IM_START)
        self.im_end_id = tokenizer.token_to_id(IM_END)
        self.endoftext_id = tokenizer.token_to_id(ENDOFTEXT)
        self.end_token_id = tokenizer.token_to_id(END_TOKENS[end_token])
        # Qwen2.5's generation_config stops on both; pad is <|endoftext|> as in Qwen's tokenizer_config.
        self.eos_token_ids = (self.im_end_id, self.endoftext_id)
        self.pad_id = self.endoftext_id
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.added_token_ids = frozenset(tokenizer.get_added_tokens_decoder())  # special tokens

    @classmethod
    def from_pretrained(cls, path: str | Path, end_token: str = "im_end",
                        default_system: str | None = QWEN25_DEFAULT_SYSTEM) -> "ChatTokenizer":
        """Load from a folder holding tokenizer.json (an HF checkpoint folder) or from the file itself."""
        if end_token not in END_TOKENS:
            raise ValueError(f"end_token must be one of {sorted(END_TOKENS)}, got {end_token!r}")
        p = Path(path)
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json at {file}" + (f" (folder {p})" if p.is_dir() else ""))
        raw = file.read_bytes()
        try:
            tok = Tokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON or an unknown model
            raise ValueError(f"{file}: not a valid tokenizer.json ({e})") from e
        return cls(tok, end_token=end_token, default_system=default_system, path=str(file),
                   sha256=hashlib.sha256(raw).hexdigest())

    # -- plain text -------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of text; added tokens in it are parsed (HF default), no BOS/EOS is added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token. A byte-level BPE piece may hold part of a UTF-8 character, which
        decode() can only show as U+FFFD; this inverts the ByteLevel byte->character map instead (GPT-2's
        bytes_to_unicode). Added (special) tokens are their own text in UTF-8."""
        piece = self._tok.id_to_token(token_id)
        if piece is None:
            raise KeyError(f"{self.path}: no token id {token_id}")
        if token_id in self.added_token_ids:
            return piece.encode()
        try:
            return bytes(_BYTE_OF_CHAR[c] for c in piece)
        except KeyError:  # not a byte-level vocabulary
            return piece.encode()

    def token_id(self, name: str) -> int:
        i = self._tok.token_to_id(name)
        if i is None:
            raise KeyError(f"{self.path}: no token {name!r} in the vocabulary")
        return i

    # -- chat -------------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict], system: str | None = None, tools: list | None = None) -> str:
        """The ChatML text encode_chat tokenizes."""
        return "".join(text for text, _, _ in self._segments(messages, system, False, tools))

    def render_prompt(self, messages: list[dict], system: str | None = None, tools: list | None = None) -> str:
        """The ChatML text encode_prompt tokenizes (ends with "<|im_start|>assistant\\n")."""
        return "".join(text for text, _, _ in self._segments(messages, system, True, tools))

    def encode_chat(self, messages: list[dict], system: str | None = None,
                    tools: list | None = None) -> tuple[list[int], list[bool]]:
        """Token ids and loss mask (True on assistant content and each assistant turn's end token)."""
        ids: list[int] = []
        mask: list[bool] = []
        for text, kind, train in self._segments(messages, system, False, tools):
            if kind == "special":
                ids.append(self._tok.token_to_id(text))
                mask.append(train)
            elif kind == "assistant":
                enc = self._tok.encode(text, add_special_tokens=False)
                h = len(_ASSISTANT_HEADER)
                ids.extend(enc.ids)
                mask.extend(end > h for _, end in enc.offsets)
            else:
                ids.extend(self._tok.encode(text, add_special_tokens=False).ids)
                mask.extend([False] * (len(ids) - len(mask)))
        return ids, mask

    def encode_prompt(self, messages: list[dict], system: str | None = None, tools: list | None = None) -> list[int]:
        """Token ids of the conversation followed by the generation prompt "<|im_start|>assistant\\n"."""
        ids: list[int] = []
        for text, kind, _ in self._segments(messages, system, True, tools):
            if kind == "special":
                ids.append(self._tok.token_to_id(text))
            else:
                ids.extend(self._tok.encode(text, add_special_tokens=False).ids)
        return ids

    def _segments(self, messages: list[dict], system: str | None, generation_prompt: bool,
                  tools: list | None = None):
        """(text, kind, trainable) pieces: kind "special" (one added token), "text", or "assistant"
        ("assistant\\n" + content, trained on from the content on). Adjacent text pieces are joined, so
        each text piece is what lies between two added tokens and encodes as the whole string would."""
        msgs = _check_messages(messages)
        if msgs and msgs[0]["role"] == "system":
            if system is not None:
                raise ValueError("system given both as an argument and as the first message; pass one")
            system, msgs = msgs[0]["content"], msgs[1:]
        elif system is None:
            system = self.default_system
        elif not isinstance(system, str):
            raise ValueError(f"system must be a string or None, got {type(system).__name__}")
        tools_block = _tools_text(tools) if tools is not None else ""  # [] is no tools, as in the template
        if tools_block:
            system = (QWEN25_DEFAULT_SYSTEM if system is None else system) + tools_block
        if generation_prompt and msgs and msgs[-1]["role"] == "assistant":
            raise ValueError("encode_prompt: the last message is an assistant turn; the generation prompt "
                             "follows a user turn")
        end = END_TOKENS[self.end_token]
        segs: list[tuple[str, str, bool]] = []
        if system is not None:
            segs += [(IM_START, "special", False), ("system\n" + system, "text", False), (IM_END, "special", False)]
        for i, m in enumerate(msgs):
            role = m["role"]
            if role == "tool":
                # A run of tool messages is one user turn of <tool_response> blocks (Qwen2.5's template).
                if i == 0 or msgs[i - 1]["role"] != "tool":
                    if segs:
                        segs.append(("\n", "text", False))
                    segs += [(IM_START, "special", False), ("user", "text", False)]
                segs.append(("\n<tool_response>\n" + m["content"] + "\n</tool_response>", "text", False))
                if i + 1 == len(msgs) or msgs[i + 1]["role"] != "tool":
                    segs.append((IM_END, "special", False))
                continue
            if segs:
                segs.append(("\n", "text", False))
            segs.append((IM_START, "special", False))
            if role == "assistant":
                content = m.get("content") or ""
                calls = m.get("tool_calls") or []
                # Without content the template writes "assistant" + "\n<tool_call>...": the same text as the
                # header "assistant\n" followed by the calls, so the header never holds trained text.
                body = ("assistant" + ("\n" + content if content else "") + "".join(map(_tool_call_text, calls))
                        if calls else _ASSISTANT_HEADER + content)
                segs += [(body, "assistant", True), (end, "special", True)]
            else:
                segs += [(role + "\n" + m["content"], "text", False), (IM_END, "special", False)]
        if generation_prompt:
            if segs:
                segs.append(("\n", "text", False))
            segs += [(IM_START, "special", False), (_ASSISTANT_HEADER, "text", False)]
        joined: list[tuple[str, str, bool]] = []
        for seg in segs:
            if seg[1] == "text" and joined and joined[-1][1] == "text":
                joined[-1] = (joined[-1][0] + seg[0], "text", False)
            else:
                joined.append(seg)
        return joined


def _tojson(x: Any) -> str:
    # transformers' chat-template `tojson` filter: json.dumps with ensure_ascii=False, default separators.
    return json.dumps(x, ensure_ascii=False)


def _tool_call_text(call: dict) -> str:
    fn = call["function"] if "function" in call else call
    return '\n<tool_call>\n{"name": "' + fn["name"] + '", "arguments": ' + _tojson(fn["arguments"]) + "}\n</tool_call>"


def _tools_text(tools: Any) -> str:
    if not isinstance(tools, list):
        raise ValueError(f"tools must be a list of function schemas, got {type(tools).__name__}")
    return _TOOLS_INTRO + "".join("\n" + _tojson(t) for t in tools) + _TOOLS_OUTRO if tools else ""


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise ValueError(f"{where}: must be a list, got {type(calls).__name__}")
    for j, call in enumerate(calls):
        fn = call.get("function", call) if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or "arguments" not in fn:
            raise ValueError(f"{where}[{j}]: expected {{'function': {{'name': str, 'arguments': ...}}}}, "
                             f"got {call!r:.100}")
        try:
            _tojson(fn["arguments"])
        except (TypeError, ValueError) as e:
            raise ValueError(f"{where}[{j}].arguments: not JSON-serialisable ({e})") from None


def _check_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, list):
        raise ValueError(f"messages must be a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content', got {m!r:.100}")
        if m["role"] not in ROLES:
            raise ValueError(f"messages[{i}].role: unknown role {m['role']!r} (expected one of {ROLES})")
        calls = m.get("tool_calls")
        if calls is not None:
            if m["role"] != "assistant":
                raise ValueError(f"messages[{i}].tool_calls: only an assistant turn calls tools")
            _check_tool_calls(calls, f"messages[{i}].tool_calls")
        if not isinstance(m["content"], str) and not (calls and m["content"] is None):
            raise ValueError(f"messages[{i}].content must be a string, got {type(m['content']).__name__}")
    return messages


def messages_from_row(row: Any, source: str = "<row>", row_index: int | None = None,
                      require_assistant: bool = True) -> list[dict]:
    """Normalise one dataset row to [{"role", "content"}, ...] (system first if the row has one).

    Accepts Sky-T1/ShareGPT rows ({"system": S, "conversations": [{"from", "value"}, ...]}, roles
    user/human, assistant/gpt, system) and OpenAI rows ({"messages": [{"role", "content"}, ...]}, content
    a string or a list of {"type": "text", "text": ...} parts, joined; OpenAI rows may also hold assistant
    turns with "tool_calls" and "tool" turns). Turns must alternate user, assistant, ... after an optional
    system turn (as LLaMA-Factory requires), except that an assistant turn with tool_calls is followed by
    one or more tool turns and then the assistant again, and a system turn may come anywhere (Qwen2.5's
    template renders a later one as a turn of its own); with require_assistant the row must end with an
    assistant turn (an empty one trains only its end token). An empty first system prompt counts as none,
    so the tokenizer's default applies (LLaMA-Factory's `system or default_system`). Any violation raises
    ValueError naming source, row index and key.
    """
    where = f"{source}: row {row_index}" if row_index is not None else source

    def fail(key: str, msg: str) -> ValueError:
        return ValueError(f"{where}: key '{key}': {msg}")

    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}")
    system: Any = None
    if "conversations" in row:
        system = row.get("system")
        if system is not None and not isinstance(system, str):
            raise fail("system", f"must be a string, got {type(system).__name__}")
        raw = _row_turns(row["conversations"], "conversations", "from", "value", _SHAREGPT_ROLES,
                         _sharegpt_content, fail)
    elif "messages" in row:
        raw = _row_turns(row["messages"], "messages", "role", "content", _OPENAI_ROLES, _openai_content, fail)
    else:
        raise ValueError(f"{where}: neither 'conversations' (ShareGPT) nor 'messages' (OpenAI) key; "
                         f"keys are {sorted(row)[:10]}")

    if raw and raw[0][1] == "system":
        if system:
            raise fail(raw[0][0], "a system turn and a top-level 'system' key; give one")
        system, raw = raw[0][2], raw[1:]
    out: list[dict] = [{"role": "system", "content": system}] if system else []
    prev = None  # the last non-system turn: "user", "assistant", "calls" (an assistant calling tools), "tool"
    for key, role, content, calls in raw:
        if role == "system":
            out.append({"role": role, "content": content})
            continue
        allowed = {None: ("user",), "user": ("assistant",), "assistant": ("user",), "calls": ("tool",),
                   "tool": ("tool", "assistant")}[prev]
        if role not in allowed:
            raise fail(key.rsplit(".", 1)[0], f"expected a {' or '.join(allowed)} turn here, got {role} "
                       "(turns must alternate user, assistant after an optional first system turn; tool "
                       "turns follow an assistant turn with tool_calls)")
        message = {"role": role, "content": content}
        if calls:
            message["tool_calls"] = calls
        out.append(message)
        prev = "calls" if calls else role
    turns = [t for t in raw if t[1] != "system"]
    if require_assistant and (not turns or turns[-1][1] != "assistant"):
        key = "conversations" if "conversations" in row else "messages"
        raise fail(key, "no assistant turn to train on" if len(turns) < 2 else "the last turn is not an assistant turn")
    return out


def _row_turns(turns: Any, list_key: str, role_key: str, content_key: str, roles: dict[str, str],
               content_of: Callable[[Any, str, Callable], str], fail) -> list[tuple[str, str, str, Any]]:
    """(key path, role, content, tool_calls or None) of each turn of a ShareGPT or OpenAI turn list; errors
    name the key."""
    if not isinstance(turns, list):
        raise fail(list_key, f"must be a list, got {type(turns).__name__}")
    raw = []
    for i, turn in enumerate(turns):
        key = f"{list_key}[{i}]"
        if not isinstance(turn, dict):
            raise fail(key, f"must be an object, got {type(turn).__name__}")
        for k in (role_key, content_key):
            if k not in turn:
                raise fail(f"{key}.{k}", "missing")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise fail(f"{key}.{role_key}", f"unknown role {turn[role_key]!r} (expected one of {sorted(roles)})")
        calls = turn.get("tool_calls") if role_key == "role" else None
        if calls is not None:
            if role != "assistant":
                raise fail(f"{key}.tool_calls", "only an assistant turn calls tools")
            try:
                _check_tool_calls(calls, "tool_calls")
            except ValueError as e:
                raise fail(f"{key}.{e.args[0].split(':', 1)[0]}", e.args[0].split(": ", 1)[1]) from None
        if calls and turn[content_key] is None:
            content = ""  # OpenAI: an assistant turn that only calls tools has content null
        else:
            content = content_of(turn[content_key], f"{key}.{content_key}", fail)
        raw.append((f"{key}.{content_key}", role, content, calls or None))
    return raw


def _sharegpt_content(value: Any, key: str, fail) -> str:
    if not isinstance(value, str):
        raise fail(key, f"must be a string, got {type(value).__name__}")
    return value


def _openai_content(content: Any, key: str, fail) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise fail(f"{key}[{i}]", f"only {{'type': 'text', 'text': str}} parts are supported, got {part!r:.100}")
            parts.append(part["text"])
        return "".join(parts)
    raise fail(key, f"must be a string or a list of text parts, got {type(content).__name__}")
