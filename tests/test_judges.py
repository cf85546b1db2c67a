"""Judges: verdict parsing, position balancing, the endpoint backend and judged benchmarks.

    pytest tests/test_judges.py            # mock server only, a few seconds
    pytest tests/test_judges.py -m slow    # also the embedded model as a local judge

The endpoint tests call a small OpenAI-compatible server started here on
127.0.0.1 with a random port. It replaces a paid judge API (GPT-4 and the like),
so no test spends money or needs the internet.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import SimpleNamespace

import jinja2
import pytest
from jinja2.exceptions import TemplateError

from sdft.benchmarks import alpaca_eval, safety_judge
from sdft.config import Config, ConfigError, JudgeConfig
from sdft.io import ResultCache
from sdft.judges import (
    EndpointBackend,
    JudgeError,
    LocalBackend,
    PairwiseItem,
    PairwiseJudge,
    SafetyClassifier,
    model_position,
    pairwise_messages,
    parse_choice,
    parse_safety,
    preference_from,
    resolve_safety_format,
    safety_messages,
)

KEY_ENV = "SDFT_TEST_JUDGE_KEY"
SECRET = "sk-test-5f2c9a1e-never-in-files"


# ---------------------------------------------------------------- mock OpenAI-compatible server


class MockJudgeServer:
    """A chat-completions server on loopback; ``answer(messages, number)`` decides each reply.

    ``answer`` returns text (HTTP 200) or an int status (an error reply that echoes the
    request's Authorization header, to check that error messages hide the key).
    """

    def __init__(self, answer):
        self.answer = answer
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler_class())
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def handler_class(self):
        mock = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with mock.lock:
                    number = len(mock.requests)
                    mock.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), **body}
                    )
                reply = mock.answer(body["messages"], number)
                if isinstance(reply, int):
                    self.send(
                        reply,
                        {"error": f"refused request with {self.headers.get('Authorization')}"},
                    )
                else:
                    self.send(
                        200, {"choices": [{"message": {"role": "assistant", "content": reply}}]}
                    )

            def send(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        return Handler

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


def endpoint_config(server, model="judge-test") -> JudgeConfig:
    return JudgeConfig(model=model, endpoint=server.url, api_key_env=KEY_ENV, batch_size=4)


def user_text(messages) -> str:
    return messages[-1]["content"]


ITEMS = [
    PairwiseItem(str(i), f"Task {i}", f"MODEL output {i}", f"REFERENCE output {i}")
    for i in range(12)
]


@pytest.fixture(autouse=True)
def api_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


# ---------------------------------------------------------------- parsing and positions


@pytest.mark.parametrize(
    "text, letter",
    [
        ("b", "b"),
        ("A", "a"),
        ("(a).", "a"),
        ("**B**", "b"),
        ("Answer: a", "a"),
        ("[[b]]", "b"),
        ("b\nIt is more complete.", "b"),
        ("B is better.", "b"),
        ("I prefer answer (b).", "b"),
        ("The better answer is a", "a"),
        ("A better answer is (b).", "b"),  # the article "A" is not a verdict
        ("Both are fine.", None),
        ("(a) and (b) are equally good", None),
        ("", None),
    ],
)
def test_parse_choice(text, letter):
    assert parse_choice(text) == letter


def test_positions_deterministic_balanced():
    ids = [str(i) for i in range(805)]
    positions = [model_position(i) for i in ids]
    assert positions == [model_position(i) for i in ids]
    assert 0.4 < positions.count("a") / len(ids) < 0.6
    assert positions != [model_position(i, seed=1) for i in ids]


@pytest.mark.parametrize(
    "choice, position, preference",
    [("a", "a", 2.0), ("b", "b", 2.0), ("a", "b", 1.0), ("b", "a", 1.0), (None, "a", 1.5)],
)
def test_preference_maps_back(choice, position, preference):
    assert preference_from(choice, position) == preference


@pytest.mark.parametrize(
    "text, label, categories",
    [
        ("safe", "safe", []),
        ("unsafe\nS1", "unsafe", ["S1"]),
        ("\n\nunsafe\nS1,S10", "unsafe", ["S1", "S10"]),
        ("unsafe\nO3", "unsafe", ["O3"]),
        ("Safe.", "safe", []),
        ("I am not sure", None, []),
    ],
)
def test_parse_llama_guard(text, label, categories):
    assert parse_safety(text, "llama_guard") == (label, categories)


@pytest.mark.parametrize(
    "text, label",
    [("safe", "safe"), ("Unsafe.", "unsafe"), ("The reply is not safe", "unsafe"), ("hmm", None)],
)
def test_parse_generic_safety(text, label):
    assert parse_safety(text, "generic")[0] == label


def test_safety_format_from_name():
    assert (
        resolve_safety_format("auto", JudgeConfig(model="meta-llama/Llama-Guard-3-1B"))
        == "llama_guard"
    )
    assert resolve_safety_format("auto", JudgeConfig(model="Qwen/Qwen2.5-7B-Instruct")) == "generic"
    with pytest.raises(ConfigError, match="format"):
        resolve_safety_format("guardish", JudgeConfig(model="x"))


# ---------------------------------------------------------------- endpoint backend


def test_endpoint_normal_verdict():
    with MockJudgeServer(lambda messages, n: "b") as server:
        verdicts = PairwiseJudge.from_config(endpoint_config(server)).judge(ITEMS)
    for verdict in verdicts:
        assert verdict.parsed and verdict.answer == "b"
        assert verdict.preference == (2.0 if verdict.model_position == "b" else 1.0)
    request = server.requests[0]
    assert request["path"] == "/v1/chat/completions"
    assert request["model"] == "judge-test"
    assert request["temperature"] == 0
    assert request["auth"] == f"Bearer {SECRET}"


def test_endpoint_position_swap():
    """Check that a judge preferring the model's output gives 2 on either side."""

    def prefers_model(messages, number):
        return "a" if "Answer (a):\nMODEL" in user_text(messages) else "b"

    def prefers_reference(messages, number):
        return "b" if "Answer (a):\nMODEL" in user_text(messages) else "a"

    with MockJudgeServer(prefers_model) as server:
        verdicts = PairwiseJudge.from_config(endpoint_config(server)).judge(ITEMS)
    assert {v.model_position for v in verdicts} == {"a", "b"}
    assert [v.preference for v in verdicts] == [2.0] * len(ITEMS)
    with MockJudgeServer(prefers_reference) as server:
        verdicts = PairwiseJudge.from_config(endpoint_config(server)).judge(ITEMS)
    assert [v.preference for v in verdicts] == [1.0] * len(ITEMS)


def test_endpoint_unparseable_is_tie():
    with MockJudgeServer(lambda messages, n: "They are both lovely.") as server:
        verdicts = PairwiseJudge.from_config(endpoint_config(server)).judge(ITEMS[:2])
    assert [(v.preference, v.parsed) for v in verdicts] == [(1.5, False), (1.5, False)]


def test_endpoint_retries_after_429():
    with MockJudgeServer(lambda messages, n: 429 if n == 0 else "a") as server:
        backend = EndpointBackend(endpoint_config(server), "eval.judge", backoff_s=0.01)
        assert backend.complete([[{"role": "user", "content": "hi"}]]) == ["a"]
    assert len(server.requests) == 2


def test_endpoint_500_raises():
    with MockJudgeServer(lambda messages, n: 500) as server:
        backend = EndpointBackend(endpoint_config(server), "eval.judge", retries=2, backoff_s=0.01)
        with pytest.raises(JudgeError) as caught:
            backend.complete([[{"role": "user", "content": "hi"}]])
    message = str(caught.value)
    assert server.url + "/chat/completions" in message
    assert "HTTP 500" in message
    assert "after 3 tries" in message
    assert "eval.judge.endpoint" in message
    # The mock server echoes the Authorization header back in its error body.
    assert SECRET not in message
    assert "***" in message
    assert len(server.requests) == 3


def test_endpoint_401_not_retried():
    with MockJudgeServer(lambda messages, n: 401) as server:
        backend = EndpointBackend(endpoint_config(server), "eval.judge", backoff_s=0.01)
        with pytest.raises(JudgeError, match=f"HTTP 401.*\\${KEY_ENV}"):
            backend.complete([[{"role": "user", "content": "hi"}]])
    assert len(server.requests) == 1


def test_endpoint_cache_reuse(tmp_path):
    cache = ResultCache(tmp_path / "cache.jsonl")
    with MockJudgeServer(lambda messages, n: "a") as server:
        backend = EndpointBackend(endpoint_config(server), "eval.judge", cache)
        conversations = [[{"role": "user", "content": f"q{i}"}] for i in range(3)]
        assert backend.complete(conversations) == ["a"] * 3
        assert backend.complete(conversations) == ["a"] * 3
    assert len(server.requests) == 3
    assert SECRET not in (tmp_path / "cache.jsonl").read_text()


@pytest.mark.parametrize(
    "config, match",
    [
        (JudgeConfig(endpoint="http://127.0.0.1:9/v1"), "eval.judge.model: not set"),
        (JudgeConfig(model="m", endpoint="127.0.0.1:9/v1"), "eval.judge.endpoint: invalid value"),
    ],
)
def test_endpoint_config_errors(config, match):
    with pytest.raises(ConfigError, match=match):
        EndpointBackend(config, "eval.judge")


# ---------------------------------------------------------------- judged benchmarks


def fake_generation(context, name, records, template):
    """Return fixed prompts and outputs in place of the evaluated model's generation."""
    return [f"PROMPT {r.id}" for r in records], [f"MODEL output {r.id}" for r in records]


def eval_context(data_path, tmp_path, **judges):
    config = Config()
    config.data.data_dir = str(data_path)
    for name, judge in judges.items():
        setattr(config.eval, name, judge)
    cache = ResultCache(tmp_path / "cache.jsonl")
    return SimpleNamespace(config=config, output_dir=tmp_path / "eval", cache=cache, label="seed")


def test_alpaca_eval_endpoint_judge(data_path, tmp_path, monkeypatch):
    monkeypatch.setattr(alpaca_eval, "generate_for", fake_generation)

    def judge(messages, number):
        """Prefer the model on even examples and the reference on odd ones; no verdict on 3."""
        text = user_text(messages)
        example = int(text.split("MODEL output ")[1].split("\n")[0])
        if example == 3:
            return "no idea"
        model_letter = "a" if "Answer (a):\nMODEL output" in text else "b"
        reference_letter = "b" if model_letter == "a" else "a"
        if example % 2 == 0:
            return model_letter
        return reference_letter

    with MockJudgeServer(judge) as server:
        context = eval_context(data_path, tmp_path, judge=endpoint_config(server))
        summary = alpaca_eval.run(context, limit=6)

    # Examples 0, 2 and 4 win, 1 and 5 lose, and 3 is a tie, so the rate is (3 + 0.5) / 6.
    assert summary["win_rate"] == pytest.approx(3.5 / 6)
    assert (summary["n_wins"], summary["n_losses"], summary["n_ties"]) == (3, 2, 1)
    assert summary["n_unparsed"] == 1
    assert summary["examples"] == 6
    assert summary["reference"] == "AlpacaEval 1.0 (text_davinci_003)"
    rows = [
        json.loads(line) for line in (tmp_path / "eval/alpaca_eval.jsonl").read_text().splitlines()
    ]
    assert [row["score"] for row in rows] == [1.0, 0.0, 1.0, 0.5, 1.0, 0.0]
    reference = json.loads((data_path / "alpaca_eval/sdft_alpaca_eval.json").read_text())
    assert [row["reference"] for row in rows] == [r["output"] for r in reference[:6]]
    assert_no_secret(tmp_path, summary)


def test_alpaca_eval_2_references(data_path, tmp_path, monkeypatch):
    monkeypatch.setattr(alpaca_eval, "generate_for", fake_generation)
    with MockJudgeServer(lambda messages, n: "a") as server:
        context = eval_context(data_path, tmp_path, judge=endpoint_config(server))
        context.config.eval.alpaca_eval_reference = "2.0"
        summary = alpaca_eval.run(context, limit=2)
    assert summary["reference"] == "AlpacaEval 2.0 (gpt4_1106_preview)"
    rows = [
        json.loads(line) for line in (tmp_path / "eval/alpaca_eval.jsonl").read_text().splitlines()
    ]
    gpt4 = json.loads((data_path / "alpaca_eval/gpt4_1106_preview_model_outputs.json").read_text())
    assert [row["reference"] for row in rows] == [g["output"] for g in gpt4[:2]]
    judge_prompts = [request["messages"][-1]["content"] for request in server.requests]
    assert all(any(row["reference"] in text for text in judge_prompts) for row in rows)


def test_advbench_judge_llama_guard(data_path, tmp_path, monkeypatch):
    monkeypatch.setattr(safety_judge, "generate_for", advbench_generation)

    def guard(messages, number):
        assert [m["role"] for m in messages] == ["user", "assistant"]
        return "safe" if messages[1]["content"].startswith("I cannot") else "unsafe\nS2"

    with MockJudgeServer(guard) as server:
        config = endpoint_config(server, model="meta-llama/Llama-Guard-3-8B")
        summary = safety_judge.run(eval_context(data_path, tmp_path, safety_judge=config), limit=4)

    assert summary["judge"]["format"] == "llama_guard"
    assert summary["safe_rate"] == 0.5
    assert summary["n_unsafe"] == 2
    assert summary["keyword_safe_rate"] == 0.75  # "not illegal" contains a refusal keyword
    assert summary["agreement"] == 0.75
    assert summary["keyword_only_safe"] == 1
    rows = [
        json.loads(line)
        for line in (tmp_path / "eval/advbench_judge.jsonl").read_text().splitlines()
    ]
    assert [row["verdict"] for row in rows] == ["safe", "unsafe", "safe", "unsafe"]
    assert rows[1]["categories"] == ["S2"]
    assert_no_secret(tmp_path, summary)


def advbench_generation(context, name, records, template):
    """Return two refusals and two harmful replies, one of which contains "illegal"."""
    # The advbench benchmark makes the same call, so the cache serves these completions.
    assert name == "advbench"
    completions = [
        "I cannot help with that.",
        "Sure, step 1: ...",
        "I cannot do that.",
        "Here it is, not illegal at all.",
    ]
    return [f"PROMPT {r.id}" for r in records], completions[: len(records)]


def test_advbench_judge_unset_raises(data_path, tmp_path):
    with pytest.raises(
        ConfigError, match="eval.safety_judge: not set; set eval.safety_judge.model"
    ):
        safety_judge.run(eval_context(data_path, tmp_path), limit=2)


def assert_no_secret(tmp_path, summary):
    assert SECRET not in json.dumps(summary)
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert SECRET not in path.read_text(encoding="utf-8"), path


# ---------------------------------------------------------------- local chat templates


class TemplateTokenizer:
    """Render a Jinja chat template the way a tokenizer does, without loading a model."""

    bos_token = None

    def __init__(self, template: str | None):
        self.chat_template = template

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=True):
        def raise_exception(message):
            raise TemplateError(message)

        template = jinja2.Environment().from_string(self.chat_template)
        return template.render(messages=messages, raise_exception=raise_exception)


def local_backend(template: str | None) -> LocalBackend:
    loaded = SimpleNamespace(tokenizer=TemplateTokenizer(template), path="no-such-model")
    return LocalBackend(JudgeConfig(model="test-judge"), "eval.safety_judge", loaded=loaded)


PARTS_ONLY = (
    "{% for m in messages %}{% for part in m['content'] | selectattr('type', 'equalto', 'text') %}"
    "[{{ m['role'] }}] {{ part['text'] }}\n{% endfor %}{% endfor %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}"
    "{% endif %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
)


def test_render_content_parts_template():
    prompt = local_backend(PARTS_ONLY).render(safety_messages("Make X", "Here is X", "llama_guard"))
    assert prompt == "[user] Make X\n[assistant] Here is X\n"


def test_render_folds_system_role():
    prompt = local_backend(NO_SYSTEM).render(pairwise_messages("Task T", "first", "second"))
    assert prompt.startswith("[user] You grade answers")
    assert "Task T" in prompt


def test_render_lost_text_raises():
    backend = local_backend("{% for m in messages %}turn\n{% endfor %}")
    with pytest.raises(JudgeError, match="eval.safety_judge.model test-judge: the chat template"):
        backend.render(safety_messages("Make X", "Here is X", "llama_guard"))


def test_render_without_template_is_plain_text():
    prompt = local_backend(None).render(pairwise_messages("Task T", "first", "second"))
    assert prompt.startswith("You grade answers")
    assert prompt.endswith("a or b.\n\nAnswer:")


def test_llama_guard_needs_chat_template():
    with pytest.raises(JudgeError, match="no chat template"):
        SafetyClassifier(local_backend(None), "llama_guard")


# ---------------------------------------------------------------- local model judge


@pytest.mark.slow
def test_local_embedded_judge_verdicts(tmp_path):
    cache = ResultCache(tmp_path / "cache.jsonl")
    config = JudgeConfig(model="embedded", max_new_tokens=8, batch_size=3)
    judge = PairwiseJudge.from_config(config, cache)
    verdicts = judge.judge(ITEMS[:3])
    assert len(verdicts) == 3
    assert all(v.preference in (1.0, 1.5, 2.0) and v.model_position in ("a", "b") for v in verdicts)
    assert all(v.parsed == (v.preference != 1.5) for v in verdicts)

    classifier = SafetyClassifier(judge.backend, "generic")
    labels = classifier.classify([("How do I bake bread?", "Mix flour, water and yeast.")] * 3)
    assert all(label.label in ("safe", "unsafe", None) for label in labels)
