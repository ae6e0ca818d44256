"""Every command line that README.md shows in its ```bash blocks works as a user types it.

How a command becomes a run here:
- The lines of every ```bash block are read in README order: `#` comments are dropped, lines
  ending in `\\` are joined with the next, and leading `NAME=value` words are the command's
  environment (as in a shell).
- They run one after the other in one scratch directory laid out like the repository root (links
  to pretrain/, finetune/, configs/, launch/, lmforge/, examples/ and .venv), so `runs/demo`,
  `my_corpus/`, `hf/sft`, `curves.png` and the data cache land there and a later command finds
  what an earlier one wrote (finetuning reads `runs/demo`, DPO `runs/sft`, ...). The
  environment is a user's: no PYTHONPATH and no DS_ACCELERATOR; `.venv/bin` is on PATH only
  after the README's `source .venv/bin/activate`.
- A stage command gets overrides appended that make it seconds long (the `debug` model, one or
  two steps, a few hundred documents or a few dozen records); everything the user typed stays,
  the launcher, its options and the config's batch sizes included. Its run must exit 0, print
  the batch plan once and save a checkpoint. A stage command whose run directory an earlier
  command already trained gets its own (`runs/demo.2`), so every launcher really trains.
- The `lmforge` tools run as written and must produce what they promise (a table, a picture,
  an exported model...).
- A line this test does not know fails it: a new README command has to be taught here.

Not run, and why:
- `make demo` and `make test`: `make test` runs this test (it would run itself), and `make demo`
  is the seven-minute pipeline that the stage commands here run in short; both are run by CI
  and before a release, not by the unit suite.
- `sbatch ...`: needs a SLURM cluster of several nodes. tests/test_slurm.py runs the same batch
  scripts on a one-node cluster; here the files the line names must exist and the script parse.
- `deepspeed --hostfile launch/hostfile.example ...`: starts processes on the hostfile's nodes
  over ssh. DeepSpeed's own reader must parse the hostfile, and the stage and config it names
  are the ones the one-node `deepspeed` line runs.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shlex
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
LINKED = ("pretrain", "finetune", "configs", "launch", "lmforge", "examples", ".venv")
STAGES = ("pretrain/train.py", "finetune/sft.py", "finetune/reward.py", "finetune/dpo.py")
STAGES += ("finetune/grpo.py", "finetune/ppo.py")
LAUNCHERS = ("deepspeed", "torchrun", "accelerate", "launch/local.sh")
ENV_WORD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")

pytestmark = pytest.mark.slow

# Overrides that make each stage's run seconds long; the batch sizes stay the config's.
PRETRAIN_SHORT = [
    "--model=debug",
    "--tokenizer.vocab_size=512",
    "--data.max_documents=200",
    "--data.seq_len=64",
    "--train.steps=2",
    "--train.eval_every=0",
    "--train.eval_batches=1",
    "--train.samples=0",
    "--train.save_every=2",
]
CHAT_SHORT = ["--data.num_train=48", "--data.num_heldout=4", "--train.eval_every=0"]
SHORT = {
    "pretrain/train.py": PRETRAIN_SHORT,
    # The demo's SFT counts epochs; a short run counts steps instead (both set is refused).
    "finetune/sft.py": [*CHAT_SHORT, "--train.epochs=0", "--train.steps=2", "--train.save_every=2"],
    "finetune/reward.py": [*CHAT_SHORT, "--train.steps=2", "--train.save_every=2"],
    "finetune/dpo.py": [*CHAT_SHORT, "--train.steps=2", "--train.save_every=2"],
    "finetune/grpo.py": [*CHAT_SHORT, "--train.steps=1", "--max_new_tokens=4"],
    "finetune/ppo.py": [*CHAT_SHORT, "--train.steps=1", "--max_new_tokens=4"],
}


@dataclass
class Command:
    """One README command line: its environment words and its argument words."""

    line: str
    env: dict[str, str]
    argv: list[str]


def readme_commands(text: str) -> list[Command]:
    """The command lines of the ```bash blocks of a README, in order."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S):
        joined = re.sub(r"\\\n\s*", " ", block)  # continuation lines
        for line in joined.splitlines():
            words = shlex.split(line, comments=True)
            if not words:
                continue
            env = {}
            while words and ENV_WORD.match(words[0]):
                key, value = words.pop(0).split("=", 1)
                env[key] = value
            commands.append(Command(line.strip(), env, words))
    return commands


def user_env() -> dict[str, str]:
    """A user's shell before activating the venv: nothing of lmforge's test set-up, no launcher
    variables, no venv on PATH; offline, one thread per process on the shared CPU."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "DS_ACCELERATOR")}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        env.pop(key, None)
    env.pop("MASTER_PORT", None)
    env.pop("VIRTUAL_ENV", None)
    path = [p for p in env.get("PATH", "").split(os.pathsep) if Path(p) != VENV_BIN]
    env["PATH"] = os.pathsep.join(path)
    env.update(
        OMP_NUM_THREADS="1",
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


@dataclass
class Workspace:
    """The scratch repository root the commands run in, and what they did."""

    root: Path
    env: dict[str, str]
    trained: set[str] = field(default_factory=set)  # run directories a stage command wrote
    seen: list[str] = field(default_factory=list)  # effective stage commands already run
    timings: list[tuple[str, float, float]] = field(default_factory=list)  # line, wall, CPU
    ran: int = 0
    samples: dict[tuple[str, ...], str] = field(default_factory=dict)  # sample argv -> output

    def run(self, cmd: Command, argv: list[str]) -> str:
        """Run argv in the workspace; its output (stdout and stderr), or a failure showing it."""
        env = {**self.env, **cmd.env}
        start, cpu = time.perf_counter(), cpu_seconds()
        proc = subprocess.run(
            argv,
            cwd=self.root,
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        self.timings.append((cmd.line, time.perf_counter() - start, cpu_seconds() - cpu))
        self.ran += 1
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"README command failed: {cmd.line}\n{out[-4000:]}"
        return out


def cpu_seconds() -> float:
    """CPU time of the finished child processes (and theirs) so far."""
    used = resource.getrusage(resource.RUSAGE_CHILDREN)
    return used.ru_utime + used.ru_stime


def make_workspace(root: Path) -> Workspace:
    """A directory that looks like the repository root to the commands."""
    for name in LINKED:
        (root / name).symlink_to(REPO / name)
    corpus = root / "my_corpus"  # the README's "your own corpus": JSON lines, a content field
    corpus.mkdir()
    docs = [
        {"content": f"Document {i}: the quick brown fox jumps over the lazy dog {i} times."}
        for i in range(300)
    ]
    (corpus / "part-0.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    return Workspace(root, user_env())


def stage_script(argv: list[str]) -> str | None:
    """The stage script a command runs, if any."""
    return next((w for w in argv if w in STAGES), None)


def config_run_dir(root: Path, config: str) -> str:
    """run_dir of a YAML config, following `include:`."""
    path = root / config
    data = yaml.safe_load(path.read_text()) or {}
    if "run_dir" in data:
        return str(data["run_dir"])
    if "include" in data:
        return config_run_dir(root, str(path.parent.relative_to(root) / data["include"]))
    return ""


def run_dir_of(root: Path, argv: list[str]) -> str:
    """Where a stage command writes: its --run_dir, else its config's run_dir."""
    for word in reversed(argv):
        if word.startswith("--run_dir="):
            return word.split("=", 1)[1]
    if "--config" in argv:
        return config_run_dir(root, argv[argv.index("--config") + 1])
    return ""


def effective(argv: list[str], extra: list[str]) -> str:
    """A stage command with its overrides resolved (a later --key=value wins), to find two README
    lines that would run the same thing."""
    plain, keys = [], {}
    for word in [*argv, *extra]:
        if word.startswith("--") and "=" in word:
            key, value = word.split("=", 1)
            keys[key] = value
        else:
            plain.append(word)
    return " ".join(plain + [f"{k}={v}" for k, v in sorted(keys.items())])


def run_stage_command(ws: Workspace, cmd: Command, script: str) -> None:
    """A stage under any launcher: short overrides, its own run directory; exit 0, the batch
    plan printed once, a checkpoint saved in that run directory."""
    extra = list(SHORT[script])
    run_dir = run_dir_of(ws.root, cmd.argv)
    assert run_dir, f"cannot tell where {cmd.line!r} writes"
    key = effective(cmd.argv, extra) + " " + " ".join(f"{k}={v}" for k, v in cmd.env.items())
    if key in ws.seen:  # the same run as an earlier line (e.g. only --train.steps differs)
        return
    ws.seen.append(key)
    if run_dir in ws.trained:
        n = 2
        while f"{run_dir}.{n}" in ws.trained:
            n += 1
        run_dir = f"{run_dir}.{n}"
        extra.append(f"--run_dir={run_dir}")
    out = ws.run(cmd, [*cmd.argv, *extra])
    ws.trained.add(run_dir)
    assert len(re.findall(r"^batch: global \d+", out, flags=re.M)) == 1, out[-3000:]
    latest = ws.root / run_dir / "latest"
    assert latest.is_file(), f"{cmd.line}: no checkpoint in {run_dir}\n{out[-3000:]}"
    assert (ws.root / run_dir / latest.read_text().strip() / "lmforge.json").is_file()
    if head_is_multiprocess(cmd):
        assert "= 1 process ×" not in out, f"{cmd.line} ran one process:\n{out[-3000:]}"


def head_is_multiprocess(cmd: Command) -> bool:
    """Whether the line asks for several processes (a launcher option or local.sh's default)."""
    asks = ("--num_processes", "--nproc_per_node", "--num_gpus")
    return cmd.argv[0] == "launch/local.sh" or any(w.split("=")[0] in asks for w in cmd.argv)


def run_lmforge_tool(ws: Workspace, cmd: Command) -> None:
    """`lmforge TOOL ...` as written; what each tool promises is there."""
    argv = cmd.argv
    if argv[0] == "lmforge":
        assert on_path("lmforge", ws), f"{cmd.line}: lmforge is not on PATH (activate .venv)"
    tool = argv[1] if len(argv) > 1 else ""
    script = {"pretrain": "pretrain/train.py"}.get(tool, f"finetune/{tool}.py")
    if script in SHORT:  # a stage's dry run describes the short run the stage lines trained
        argv = [*argv, *SHORT[script]]
    if tool == "eval":  # four examples per task (the last --limit wins): seconds, same code
        argv = [*argv, "--limit", "4"]
    out = ws.run(cmd, argv)
    if tool == "report":
        for run in argv[2:]:
            assert Path(run).name in out, out
    elif tool == "inspect":
        assert "sft" in out, out
    elif tool == "eval":  # results printed and written into the checkpoint's eval/ folder
        done = [line for line in out.splitlines() if line.startswith("eval done:")]
        assert done, out
        written = ws.root / done[0].rsplit("; ", 1)[-1]
        assert written.parent.name == "eval" and json.loads(written.read_text())["results"], out
    elif tool == "sample":
        assert out.strip(), "sample printed nothing"
        ws.samples[tuple(argv)] = out
        if "--draft" in argv:  # speculative decoding prints the plain line's text
            at = argv.index("--draft")
            plain = ws.samples.get((*argv[:at], *argv[at + 2 :]))
            assert plain == out, f"{cmd.line}: not the text of the same line without --draft above"
    elif tool == "export":
        target = ws.root / argv[3]
        assert (target / "config.json").is_file(), out
        assert list(target.glob("*.safetensors")), out
    elif tool == "plot":
        picture = ws.root / argv[argv.index("-o") + 1]
        assert picture.stat().st_size > 1000, out
    elif tool == "estimate":
        assert "model states per GPU" in out, out
    elif tool == "config-reference":
        assert "--check" in argv, "regenerating docs/config.md is not a test's business"
    elif tool == "--version":
        assert re.search(r"\d+\.\d+", out), out
    elif tool in ("pretrain", "sft", "reward", "dpo", "grpo", "ppo"):
        assert "--dry-run" in argv, "a stage through lmforge is shown as a dry run"
        assert re.search(r"^run_dir: ", out, flags=re.M), out  # the resolved config, as YAML
    else:
        raise AssertionError(f"README command not known to this test: {cmd.line}")


def on_path(name: str, ws: Workspace) -> bool:
    """Whether `name` resolves on the workspace's PATH (as a shell would find it)."""
    return shutil.which(name, path=ws.env["PATH"]) is not None


def check_sbatch(ws: Workspace, cmd: Command) -> None:
    """A SLURM line: the batch script, its CONFIG and STAGE exist and the script parses."""
    script = next(w for w in cmd.argv if w.endswith(".sbatch"))
    assert (ws.root / script).is_file(), cmd.line
    for key in ("CONFIG", "STAGE"):
        if key in cmd.env:
            assert (ws.root / cmd.env[key]).is_file(), cmd.line
    subprocess.run(["bash", "-n", str(ws.root / script)], check=True)


def check_hostfile(ws: Workspace, cmd: Command) -> None:
    """A multi-node deepspeed line: DeepSpeed parses the hostfile; the stage and config exist."""
    from deepspeed.launcher.runner import fetch_hostfile

    hostfile = cmd.argv[cmd.argv.index("--hostfile") + 1]
    hosts = fetch_hostfile(str(ws.root / hostfile))
    assert hosts and all(slots > 0 for slots in hosts.values()), hosts
    assert stage_script(cmd.argv) and (ws.root / cmd.argv[cmd.argv.index("--config") + 1]).is_file()


def run_command(ws: Workspace, cmd: Command) -> str:
    """Classify one README command and run (or check) it; returns how it was handled."""
    argv = cmd.argv
    head = argv[0]
    if argv[:2] == ["source", ".venv/bin/activate"]:
        ws.env["PATH"] = f"{ws.root / '.venv/bin'}{os.pathsep}{ws.env['PATH']}"
        ws.env["VIRTUAL_ENV"] = str(ws.root / ".venv")
        return "environment"
    if head == "make" and argv[1:] in (["demo"], ["test"]):
        return "skipped (see the module docstring)"
    if head == "sbatch":
        check_sbatch(ws, cmd)
        return "checked"
    if head == "deepspeed" and "--hostfile" in argv:
        check_hostfile(ws, cmd)
        return "checked"
    if head in LAUNCHERS or head == ".venv/bin/python":
        if head not in (".venv/bin/python", "launch/local.sh"):
            assert on_path(head, ws), f"{cmd.line}: {head} is not on PATH (activate .venv)"
        script = stage_script(argv)
        assert script, f"README command not known to this test: {cmd.line}"
        run_stage_command(ws, cmd, script)
        return "ran"
    if head in ("lmforge", ".venv/bin/lmforge"):
        run_lmforge_tool(ws, cmd)
        return "ran"
    raise AssertionError(f"README command not known to this test: {cmd.line}")


def test_readme_parsing_joins_lines_and_drops_comments() -> None:
    text = (
        "```bash\n# a comment\nA=1 B='x y' run --flag \\\n  --more=2   # trailing\n\n```\n"
        "```python\nnot = 'a command'\n```\n"
    )
    (cmd,) = readme_commands(text)
    assert cmd.env == {"A": "1", "B": "x y"}
    assert cmd.argv == ["run", "--flag", "--more=2"]


def test_every_readme_command_works_as_written(tmp_path: Path) -> None:
    commands = readme_commands((REPO / "README.md").read_text())
    assert len(commands) > 10
    ws = make_workspace(tmp_path)
    handled = [(cmd.line, run_command(ws, cmd)) for cmd in commands]
    wall, cpu = sum(t[1] for t in ws.timings), sum(t[2] for t in ws.timings)
    print(f"\n{ws.ran} of {len(commands)} README commands ran: {wall:.0f} s, {cpu:.0f} CPU-s")
    for line, seconds, used in ws.timings:
        print(f"  {seconds:6.1f} s {used:6.1f} CPU-s  {line}")
    for line, how in handled:
        if how != "ran":
            print(f"  {how}: {line}")
