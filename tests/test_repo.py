"""The repository's own contracts: CI runs the README's test command, the
package has no import cycle, and the commands start light."""

import ast
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Tests.*?```bash\n(.*?)```", readme, re.S).group(1)
    command = [line for line in block.splitlines() if "pytest" in line]
    assert len(command) == 1
    ci = (ROOT / ".ci" / "run").read_text()
    assert command[0].strip() in [line.strip() for line in ci.splitlines()]
    assert "torch==2.13.0" in ci and ".[test]" in ci


def _module_imports(package: Path):
    """``{module: {modules it imports at load time}}`` within the package
    (imports inside functions run later and cannot form a load-time cycle)."""
    graph = {}
    for path in package.rglob("*.py"):
        rel = path.relative_to(package.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        name = ".".join(parts)
        pkg = parts if path.name == "__init__.py" else parts[:-1]
        deps = set()
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and node.level:
                base = pkg[: len(pkg) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
                deps.add(target)
                if not node.module:  # from . import x
                    deps.update(f"{target}.{a.name}" for a in node.names)
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith(package.name))
        graph[name] = deps
    return {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}


def test_no_import_cycles_in_the_package():
    graph = _module_imports(ROOT / "mlx_memosight")
    assert len(graph) > 20
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(graph[m]):
            # a package's __init__ importing its own submodules is not a cycle
            if m.startswith(d + ".") and graph.get(d) and m in graph[d]:
                continue
            if state.get(d) == "open":
                raise AssertionError(" -> ".join(stack + [m, d]))
            if d not in state:
                visit(d, stack + [m])
        state[m] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_commands_start_without_mlx():
    """Every command module imports nothing heavy at load time, so Ctrl-C
    during start-up reaches the command's own handler."""
    code = ("import sys\n"
            "import mlx_memosight.__main__ as m, importlib\n"
            "for name in m.COMMANDS:\n"
            "    importlib.import_module('mlx_memosight.' + name).build_parser()\n"
            "heavy = sorted(k for k in sys.modules if k.split('.')[0] in ('mlx', 'mlx_lm', 'numpy', "
            "'transformers', 'torch', 'gguf'))\n"
            "print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_every_subpackage_is_installed():
    """pyproject lists packages one by one; a subpackage left out would be
    missing from a plain `pip install .`."""
    tomllib = pytest.importorskip("tomllib")
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "mlx_memosight").rglob("__init__.py")}
    assert found - {"mlx_memosight.demo_model"} <= listed


COMMAND_NAMES = ("generate", "convert", "lora", "fuse", "evaluate", "bench", "server", "chat")


@pytest.mark.parametrize("name", COMMAND_NAMES)
def test_every_flag_has_help(name):
    import importlib

    parser = importlib.import_module(f"mlx_memosight.{name}").build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), f"{name}: {action.option_strings or action.dest}"


@pytest.mark.parametrize("where", ["import", "work"])
def test_ctrl_c_during_an_import_leaves_at_once(tmp_path, where):
    """Ctrl-C while a command imports a module ends the process there (an
    extension module calling Python from C++ as it loads could otherwise abort
    it), removing the unfinished output; elsewhere it is Python's
    KeyboardInterrupt, so the command's cleanup runs."""
    interrupt = "import os, signal, time\nos.kill(os.getpid(), signal.SIGINT)\ntime.sleep(5)\nprint('went on')\n"
    (tmp_path / "slow_module.py").write_text(interrupt)
    body = "import slow_module" if where == "import" else interrupt.replace("\n", "\n            ")
    # a script whose name starts like the console scripts' runs as a command does
    script = tmp_path / "mlx_memosight_probe.py"
    script.write_text(
        "import argparse\n"
        "import mlx_memosight\n"
        "from mlx_memosight import cli\n"
        "from mlx_memosight.outputs import staged_folder\n"
        "def body(args):\n"
        "    try:\n"
        "        with staged_folder('out/model') as tmp:\n"
        "            (tmp / 'weights').write_text('half')\n"
        "            print('unfinished', flush=True)\n"
        f"            {body}\n"
        "    finally:\n"
        "        print('cleanup ran', flush=True)\n"
        "cli.run(argparse.ArgumentParser(prog='probe'), body, [])\n"
    )
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert r.returncode == 130, r.stderr
    assert "Traceback" not in r.stderr and r.stderr.strip().splitlines()[-1] == "probe: interrupted"
    assert "went on" not in r.stdout
    assert ("cleanup ran" in r.stdout) == (where == "work"), r.stdout
    # the output being written is removed either way, with the folder made for it
    assert "unfinished" in r.stdout and not (tmp_path / "out").exists()


@pytest.mark.parametrize("delay", [0.1, 0.5, 1.5])
def test_ctrl_c_at_any_moment_exits_130_without_a_traceback(delay):
    """Ctrl-C while the command imports, loads the model or generates (without
    compression the demo model writes until the token limit, several seconds)."""
    import time

    p = subprocess.Popen([sys.executable, "-m", "mlx_memosight.generate", "--prompt",
                          "Mia has 25 apples. Every day she buys 3. How many apples does she have after "
                          "12 days?", "--max-tokens", "5000", "--no-compress"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                         # as from a terminal, even when the tests run as a background job (whose
                         # shell has them ignore Ctrl-C, which Python then leaves ignored)
                         preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].endswith("interrupted"), err
