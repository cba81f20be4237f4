"""The README contract: every Python block runs as written, in order, and gives what it says.

The blocks run in one namespace in a fresh interpreter, in a scratch folder (one writes ``acts/``). A
top-level line ``expression   # value ...`` whose comment starts with a Python literal states that
value; the test checks it where the line stands, so a README claim cannot drift from the code.
"""
import ast
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_LITERAL = re.compile(r"\s*(\[[^\]]*\]|True|False|None|-?\d+(?:\.\d+)?)(?![\w.])")


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def claim(line: str):
    """``(expression, value)`` if ``line`` states the value of an expression, else None."""
    code, sep, comment = line.partition("#")
    head = _LITERAL.match(comment) if sep else None
    if head is None or line[:1].isspace():
        return None
    try:
        ast.parse(code.strip(), mode="eval")
    except SyntaxError:
        return None  # an assignment or another statement
    return code.strip(), ast.literal_eval(head.group(1))


def checked_script(blocks: list[str]) -> tuple[str, int]:
    """The blocks, in order, with every stated value recorded where its line stands."""
    lines, count = ["__claims__ = []"], 0
    for block in blocks:
        for line in block.splitlines():
            c = claim(line)
            if c:
                lines.append(f"__claims__.append(({c[0]!r}, bool(({c[0]}) == {c[1]!r})))")
                count += 1
            else:
                lines.append(line)
        lines.append("")
    lines += ["import json", "print('@@' + json.dumps(__claims__))"]
    return "\n".join(lines), count


def test_the_stated_values_are_recognised():
    stated = [c for b in python_blocks() for c in map(claim, b.splitlines()) if c]
    assert ("len(store)", 512) in stated and ("wb.hook_names(model)", ["0", "1", "2"]) in stated
    assert sum(expr.endswith(".passed") for expr, _ in stated) == 4
    assert claim("x = f()  # 3") is None and claim("    f()  # 3") is None and claim("f()  # see below") is None


@pytest.mark.slow
@pytest.mark.transformer
def test_readme_python_blocks_run_as_written(tmp_path):
    script, count = checked_script(python_blocks())
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    stated = json.loads(result.stdout.rpartition("@@")[2])
    wrong = [expr for expr, ok in stated if not ok]
    assert len(stated) == count and not wrong, f"the README states values these lines do not give: {wrong}"
