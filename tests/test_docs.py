"""Every shell command of README.md and docs/*.md, as written there.

Each command in a ```bash block, or written inline as `python ...` (also `bash`, `torchrun`,
`make`), is checked: the program and the files it names exist, and its
options parse with the parser of the script that reads them (main.py's for main.py, torchrun's and
then main.py's for torchrun, and so on), so a misspelt flag fails here. Commands that need only the
toy data also run, in document order in one work folder, shrunk by options appended to them
(argparse keeps the last): a main.py command with `--dataset_file toy`, predict.py, the plots and
`python -c`. Inputs that such a command names but the folder lacks get stand-ins from the toy run
(a checkpoint, images, a run folder). Everything else (COCO, GPUs, Slurm, downloads, builds, the
published code) is only parsed.
"""
import argparse
import contextlib
import glob
import io
import os
import re
import runpy
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", *sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))]

# appended to the commands that run, so that they finish in seconds
SHRINK_TOY = ["--toy_num_train", "4", "--toy_num_val", "2", "--epochs", "1", "--batch_size", "2",
              "--device", "cpu", "--num_workers", "0", "--vis_images", "2"]
SHRINK_PREDICT = ["--size", "96", "--max_size", "96", "--device", "cpu"]
# the inputs a running script reads, by the names of its parsed options
INPUTS = {"predict.py": ("resume", "images"), "util/plot_utils.py": ("folders",)}
SHELL_LANGUAGES = {"bash", "sh", "shell"}


def shell_blocks(text):
    """The bodies of the fenced blocks of a shell language in a Markdown text."""
    return [m.group(2) for m in re.finditer(r"^```(\w*)\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
            if m.group(1) in SHELL_LANGUAGES]


def commands(block):
    """The commands of a block as token lists: lines joined, comments dropped, `NAME="..."`
    variables expanded, `&&` / `;` chains split, `...` placeholders dropped."""
    variables, result = {}, []
    for line in block.replace("\\\n", " ").splitlines():
        line = re.sub(r"\$(\w+)", lambda m: variables.get(m.group(1), m.group(0)), line)
        tokens = shlex.split(line, comments=True)
        if len(tokens) == 1 and re.fullmatch(r"[A-Z_]+=.*", tokens[0]):
            name, value = tokens[0].split("=", 1)
            variables[name] = value
            continue
        current = []
        for token in tokens + ["&&"]:
            if token in ("&&", ";"):
                if current:
                    result.append(current)
                current = []
            elif token != "...":
                current.append(token)
    return result


def inline_commands(text):
    """Commands written inline in the prose: `python ...`, `bash ...`, `torchrun ...`, `make ...`."""
    text = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"`((?:python|bash|torchrun|make) [^`]+)`", text)


def all_commands():
    found = []
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        for block in [*shell_blocks(text), *inline_commands(text)]:
            found += [(doc, command) for command in commands(block)]
    return found


def placeholder_free(tokens):
    """Upper-case placeholders (HOST, NODE_RANK, PUBLISHED) as a value every parser takes."""
    return [re.sub(r"\b[A-Z][A-Z_]+\b", "0", t) if re.fullmatch(r"[A-Z_:0-9./-]+", t) else t
            for t in tokens]


class _Parsed(Exception):
    pass


def parse_script(path, argv, module=None):
    """Runs a script until its own code has parsed argv: returns the Namespace, or fails with the
    parser's message. The script's work after that does not run."""
    real, real_known = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args
    script = os.path.realpath(path)
    known = {}     # what the script's own parse_known_args calls gave, as predict.py makes them

    def from_script():
        return os.path.realpath(sys._getframe(2).f_code.co_filename) == script

    def parse_known_args(self, args=None, namespace=None):
        result = real_known(self, args, namespace)
        if from_script():
            known.update(vars(result[0]))
        return result

    def parse_args(self, args=None, namespace=None):
        result = real(self, args, namespace)
        if from_script():
            raise _Parsed(argparse.Namespace(**{**vars(result), **known}))
        return result

    saved_argv, saved_path, stderr = sys.argv, list(sys.path), io.StringIO()
    sys.argv = [path, *argv]
    if not module:
        sys.path.insert(0, os.path.dirname(script))     # as `python SCRIPT` does
    argparse.ArgumentParser.parse_args = parse_args
    argparse.ArgumentParser.parse_known_args = parse_known_args
    try:
        with contextlib.redirect_stderr(stderr):
            if module:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            else:
                runpy.run_path(path, run_name="__main__")
    except _Parsed as parsed:
        return parsed.args[0]
    except SystemExit as err:
        pytest.fail(f"{path} {shlex.join(argv)}: its parser refused it ({err.code}):\n{stderr.getvalue()}")
    finally:
        argparse.ArgumentParser.parse_args = real
        argparse.ArgumentParser.parse_known_args = real_known
        sys.argv, sys.path[:] = saved_argv, saved_path
    pytest.fail(f"{path} did not parse its options")


def python_target(tokens):
    """For `python ...`: (script path relative to ROOT, module name or None, its argv)."""
    if tokens[1] == "-m":
        module = tokens[2]
        path = module.replace(".", "/") + ".py"
        return path, module, tokens[3:]
    return tokens[1], None, tokens[2:]


def launcher(tokens):
    """torchrun / torch.distributed.launch: the launcher's options parsed, then (script, argv)."""
    if tokens[0] == "torchrun":
        from torch.distributed.run import parse_args
        launcher_argv = tokens[1:]
    else:
        from torch.distributed.launch import parse_args
        launcher_argv = tokens[3:]
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            ns = parse_args(launcher_argv)
    except SystemExit:
        pytest.fail(f"{shlex.join(tokens)}: the launcher refused it:\n{err.getvalue()}")
    return ns.training_script, ns.training_script_args


class Work:
    """The folder the runnable commands run in, and the toy data they share."""

    def __init__(self, folder):
        self.folder = folder
        self.toy_path = os.path.join(folder, "_toy_data")
        self.toy_run = None          # the output folder of the first toy training

    def path(self, name):
        return os.path.join(self.folder, name)

    def stand_in(self, script, ns):
        for name in INPUTS.get(script, ()):
            values = getattr(ns, name)
            for value in values if isinstance(values, list) else [values]:
                if os.path.exists(self.path(value)):
                    continue
                assert self.toy_run, f"{value}: no toy run to take a stand-in from"
                if value.endswith(".pth"):
                    os.makedirs(os.path.dirname(self.path(value)), exist_ok=True)
                    shutil.copy(os.path.join(self.toy_run, "checkpoint.pth"), self.path(value))
                elif value.lower().endswith((".jpg", ".jpeg", ".png")):
                    shutil.copy(self.toy_images()[0], self.path(value))
                elif name == "images":
                    os.makedirs(self.path(value))
                    for image in self.toy_images()[:2]:
                        shutil.copy(image, self.path(value))
                else:
                    shutil.copytree(self.toy_run, self.path(value))

    def toy_images(self):
        return sorted(glob.glob(os.path.join(self.toy_path, "val2017", "*")))

    def run(self, tokens):
        env = dict(os.environ, PYTHONPATH=ROOT, PYTHONUNBUFFERED="1")
        argv = [sys.executable, *tokens[1:]]
        if argv[1].endswith(".py"):
            argv[1] = os.path.join(ROOT, argv[1])
        proc = subprocess.run(argv, cwd=self.folder, env=env, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, f"{shlex.join(tokens)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc


def check(doc, tokens, work):
    """Checks one command; runs it in `work` when it needs only the toy data."""
    where = f"{doc}: {shlex.join(tokens)}"
    tokens = placeholder_free([t for t in tokens if not re.fullmatch(r"[A-Z_]+=\S*", t)])
    program = tokens[0]
    if program == "make":
        with open(os.path.join(ROOT, "Makefile")) as f:
            targets = re.findall(r"^([\w.-]+):", f.read(), re.MULTILINE)
        assert set(tokens[1:]) <= set(targets), f"{where}: no such make target"
        return
    if program == "cd":
        return
    if program in (".", "source", "bash"):
        assert os.path.exists(os.path.join(ROOT, tokens[1])) or tokens[1].startswith(".venv"), where
        return
    if program == "pip":
        for i, token in enumerate(tokens):
            if tokens[i - 1] == "-r" or token.startswith("./"):
                assert os.path.exists(os.path.join(ROOT, token)), f"{where}: {token} is missing"
        return
    if program in ("torchrun", "python") and (program == "torchrun" or tokens[1:3] == ["-m", "torch.distributed.launch"]):
        script, argv = launcher(tokens)
        assert script == "main.py", where
        parse_script(os.path.join(ROOT, script), argv)
        return
    assert program == "python", f"{where}: the test does not know how to check {program}"
    if tokens[1] == "-c":
        work.run(tokens)
        return
    if tokens[1:3] == ["-m", "venv"]:
        return
    path, module, argv = python_target(tokens)
    if module == "pytest":
        assert all(os.path.exists(os.path.join(ROOT, a)) for a in argv if not a.startswith("-")), where
        return
    for base in (ROOT, os.path.join(ROOT, "rpe_ops")):   # `cd rpe_ops && python setup.py ...`
        if os.path.isfile(os.path.join(base, path)):
            break
    else:
        pytest.fail(f"{where}: {path} does not exist")
    full = os.path.join(base, path)
    with open(full) as f:
        if "argparse" not in f.read():
            return                                           # setup.py and the like: not run
    if module:
        module_argv = argv
        ns = parse_script(full, module_argv, module=module)
    else:
        ns = parse_script(full, argv)
    script = os.path.relpath(full, ROOT)
    if script == "main.py" and ns.dataset_file == "toy":
        out = os.path.join(work.folder, ns.output_dir or ".")
        work.run([*tokens, "--toy_path", work.toy_path, *SHRINK_TOY])
        if not ns.eval and work.toy_run is None:
            work.toy_run = out
    elif script == "predict.py":
        work.stand_in(script, ns)
        work.run([*tokens, *SHRINK_PREDICT])
        assert os.path.isfile(os.path.join(work.path(ns.output_dir), "predictions.json")), where
    elif script == "util/plot_utils.py":
        work.stand_in(script, ns)
        work.run(tokens)
        assert os.path.isfile(work.path(ns.out)), where


def test_there_are_commands():
    found = all_commands()
    docs_with_commands = {doc for doc, _ in found}
    assert "README.md" in docs_with_commands and len(found) > 20


def test_every_docs_page_is_linked_from_the_readme():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    for doc in DOCS[1:]:
        assert f"({doc})" in readme, f"README.md does not link {doc}"


def test_a_misspelt_flag_fails(tmp_path):
    with pytest.raises(pytest.fail.Exception, match="refused"):
        check("x.md", ["python", "main.py", "--dataset_file", "toy", "--epochs", "1", "--lr_dorp", "3"], Work(str(tmp_path)))


def test_commands(tmp_path):
    work = Work(str(tmp_path))
    for doc, tokens in all_commands():
        check(doc, tokens, work)
    assert work.toy_run is not None, "no command trained on the toy data"
