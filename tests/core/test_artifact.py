"""The steering folder as one unit: real kill -9 at every step of a save, a config with weights
it does not belong to, stale temporary files, older formats, concurrent saves and loads, and
paths that are neither a folder nor a hub repo (never touching the network)."""

from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from dsas_diffusion import Steering
from dsas_diffusion.core.artifact import PAUSE_ENV, SAVE_STEPS
from dsas_diffusion.core.config import FORMAT_VERSION
from tests.core.test_steering import Tiny, fitted

ROOT = Path(__file__).resolve().parents[2]
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="the saving processes are forked (POSIX)")

# One interpreter loads the two steerings, then forks one process per job (torch is imported
# once): a "pause" job saves the new steering with DSAS_SAVE_PAUSE=<step>, a "loop" job saves the
# two in turn until killed. It reports each job's pid, then how each process ended.
SAVER = r"""
import json, os, sys
from dsas_diffusion import Steering
from dsas_diffusion.core.artifact import PAUSE_ENV
old, new = Steering.from_pretrained(sys.argv[1]), Steering.from_pretrained(sys.argv[2])
say = lambda text: os.write(1, (text + "\n").encode())  # one write: lines of forked processes never interleave
pids = []
for i, job in enumerate(json.loads(sys.argv[3])):
    pid = os.fork()
    if pid == 0:
        if job["pause"]:
            os.environ[PAUSE_ENV] = job["pause"]
            new.save_pretrained(job["folder"])
        else:
            k = 0
            while True:
                (old, new)[k % 2].save_pretrained(job["folder"])
                if k == 0:
                    say(f"looping {i}")
                k += 1
        os._exit(0)
    pids.append(pid)
    say(f"job {i} pid {pid}")
for pid in pids:
    _, status = os.waitpid(pid, 0)
    say(f"ended {pid} signal {os.WTERMSIG(status) if os.WIFSIGNALED(status) else 0}")
"""


def two_fits():
    """Two fits of the same layer names on two models: only the digest tells their files apart."""
    old, _, _ = fitted(Tiny(seed=0), method="linear_act")
    new, _, _ = fitted(Tiny(seed=1), method="linear_act")
    assert old.layers == new.layers and not torch.equal(old.maps["blocks.0"].alpha, new.maps["blocks.0"].alpha)
    return old, new


def same(a: Steering, b: Steering) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return (a.config.to_dict() | {"format_version": 0}) == (b.config.to_dict() | {"format_version": 0}) and \
        sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def outcome(folder, old, new) -> str:
    try:
        loaded = Steering.from_pretrained(folder)
    except ValueError as e:
        assert "does not belong to" in str(e) and "fit and save the steering again" in str(e), e
        return "refused"
    return "old" if same(loaded, old) else "new" if same(loaded, new) else "MIXED"


def temporaries(folder) -> list[str]:
    return sorted(p.name for p in Path(folder).iterdir() if p.name.endswith(".tmp"))


def write_format_1(folder) -> None:
    """Rewrite a saved folder as a format 1 file (no digest), as dsas-diffusion 0.1 wrote them."""
    path = Path(folder) / "steering_config.json"
    doc = json.loads(path.read_text())
    del doc["weights_sha256"]
    path.write_text(json.dumps({**doc, "format_version": 1}, indent=2, sort_keys=True))


class Lines:
    """The stdout and stderr lines of a process, read from the raw pipes as they come (no buffered
    reader: a line held in one would be invisible to select)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc, self.lines = proc, []
        self._partial = {proc.stdout.fileno(): b"", proc.stderr.fileno(): b""}

    def wait_for(self, pattern: str, timeout: float = 180.0) -> re.Match:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines:
                m = re.search(pattern, line)
                if m:
                    return m
            if time.monotonic() > deadline:
                raise AssertionError(f"no line matched {pattern!r}; got:\n{''.join(self.lines)}")
            ready, _, _ = select.select(list(self._partial), [], [], 0.5)
            for fd in ready:
                chunk = os.read(fd, 65536)
                *done, self._partial[fd] = (self._partial[fd] + chunk).split(b"\n")
                self.lines += [line.decode() + "\n" for line in done]


def run_saver(old_dir: Path, new_dir: Path, jobs: list[dict], kill_after=lambda i: 0.0) -> dict[int, int]:
    """Run the jobs, kill -9 each one at its moment; returns {job: signal it ended by}. Whatever
    fails, no saving process outlives the test."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop(PAUSE_ENV, None)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(old_dir), str(new_dir), json.dumps(jobs)], env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, pids = Lines(proc), {}
    try:
        for i in range(len(jobs)):
            pids[i] = int(out.wait_for(rf"job {i} pid (\d+)").group(1))
        for i, job in enumerate(jobs):
            if job["pause"]:
                out.wait_for(rf"save_pretrained \(pid {pids[i]}\) paused after {job['pause']}")
            else:
                out.wait_for(rf"^looping {i}$")
                time.sleep(kill_after(i))
            os.kill(pids[i], signal.SIGKILL)
        ended = {i: int(out.wait_for(rf"ended {pids[i]} signal (\d+)").group(1)) for i in range(len(jobs))}
        proc.wait(timeout=60)
        return ended
    finally:
        reaped = "".join(out.lines)
        for pid in pids.values():
            if f"ended {pid} " in reaped:  # waited for: the pid may already be another process's
                continue
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


@pytest.fixture(scope="module")
def killed_saves(tmp_path_factory):
    """An old folder, then a save of the new steering into it killed by SIGKILL after each step
    (and, for a format 1 old folder, after the config is replaced)."""
    base = tmp_path_factory.mktemp("kills")
    old, new = two_fits()
    old.save_pretrained(base / "old")
    new.save_pretrained(base / "new")
    cases = [(step, 2) for step in SAVE_STEPS] + [("config_replaced", 1)]
    jobs = []
    for step, version in cases:
        folder = base / f"{step}-v{version}"
        shutil.copytree(base / "old", folder)
        if version == 1:
            write_format_1(folder)
        jobs.append({"folder": str(folder), "pause": step})
    ended = run_saver(base / "old", base / "new", jobs)
    assert set(ended.values()) == {signal.SIGKILL}
    return {case: Path(job["folder"]) for case, job in zip(cases, jobs)}, old, new


EXPECTED = {  # what the folder holds once the save is killed after each step
    "stale_removed": ("old", []),
    "weights_written": ("old", [".steering.safetensors", ".steering_config.json"]),
    "config_written": ("old", [".steering.safetensors", ".steering_config.json"]),
    "config_replaced": ("refused", [".steering.safetensors"]),
    "weights_replaced": ("new", []),
}


@needs_fork
@pytest.mark.parametrize("step", SAVE_STEPS)
def test_a_save_killed_after_each_step_leaves_the_old_or_the_new_steering_or_a_clear_refusal(killed_saves, step):
    folders, old, new = killed_saves
    folder = folders[step, 2]
    want, leftovers = EXPECTED[step]
    assert outcome(folder, old, new) == want
    assert [name.rsplit(".", 2)[0] for name in temporaries(folder)] == leftovers
    new.save_pretrained(folder)  # the next save removes what the killed one left and completes the folder
    assert sorted(p.name for p in folder.iterdir()) == ["steering.safetensors", "steering_config.json"]
    assert outcome(folder, old, new) == "new"


@needs_fork
def test_a_format_1_folder_killed_between_the_renames_is_refused_not_mixed(killed_saves):
    """The old config (format 1) has no digest; the new one, renamed first, has."""
    folders, old, new = killed_saves
    assert outcome(folders["config_replaced", 1], old, new) == "refused"


@needs_fork
def test_saves_killed_at_random_moments_never_leave_a_mixed_folder(tmp_path):
    """Processes save the two steerings in turn, as fast as they can, until killed at a random moment."""
    old, new = two_fits()
    old.save_pretrained(tmp_path / "old")
    new.save_pretrained(tmp_path / "new")
    rng = random.Random(0)
    jobs = [{"folder": str(tmp_path / f"k{i}"), "pause": None} for i in range(6)]
    ended = run_saver(tmp_path / "old", tmp_path / "new", jobs, kill_after=lambda i: rng.uniform(0, 0.2))
    assert set(ended.values()) == {signal.SIGKILL}
    for job in jobs:
        assert outcome(job["folder"], old, new) in {"old", "new", "refused"}


def test_a_config_with_the_weights_of_another_fit_is_refused(tmp_path):
    old, new = two_fits()
    old.save_pretrained(tmp_path / "a")
    new.save_pretrained(tmp_path / "b")
    shutil.copy(tmp_path / "b" / "steering.safetensors", tmp_path / "a" / "steering.safetensors")
    with pytest.raises(ValueError, match=r"steering_config.json does not belong to .*steering.safetensors.*sha256"
                                         r".*fit and save the steering again"):
        Steering.from_pretrained(tmp_path / "a")


def test_the_next_save_removes_stale_temporary_files_and_only_those(tmp_path):
    steering, _ = two_fits()
    steering.save_pretrained(tmp_path)
    stale = [".steering.safetensors.k1ll3d.tmp", ".steering_config.json.abc123.tmp"]
    kept = [".other.json.x.tmp", "notes.txt"]
    for name in stale + kept:
        (tmp_path / name).write_text("left behind")
    steering.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept + ["steering.safetensors", "steering_config.json"])


def test_the_config_names_the_digest_of_its_weights_and_a_save_does_not_touch_the_config_object(tmp_path):
    import hashlib

    steering, _ = two_fits()
    before = steering.config.to_dict()
    steering.save_pretrained(tmp_path)
    doc = json.loads((tmp_path / "steering_config.json").read_text())
    assert doc["format_version"] == FORMAT_VERSION
    assert doc["weights_sha256"] == hashlib.sha256((tmp_path / "steering.safetensors").read_bytes()).hexdigest()
    assert steering.config.to_dict() == before


def test_format_1_folders_still_load_without_the_digest_check(tmp_path):
    """Files of format 1 (no digest), also with the one-parameter fingerprint of the first releases."""
    model = Tiny()
    steering, source, _ = fitted(model, method="linear_act")
    steering.save_pretrained(tmp_path)
    write_format_1(tmp_path)
    loaded = Steering.from_pretrained(tmp_path)
    assert same(loaded, steering) and loaded.config.format_version == 1
    path = tmp_path / "steering_config.json"
    doc = json.loads(path.read_text())
    doc["fingerprint"][""] = {k: v for k, v in doc["fingerprint"][""].items() if k != "probe_parameters"}
    doc["fingerprint"][""]["probe_parameter"] = "blocks.0.weight"
    path.write_text(json.dumps(doc))
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp_path / "steering.safetensors")
    tensors["__fingerprint__."] = tensors["__fingerprint__."][:8].clone()
    save_file(tensors, tmp_path / "steering.safetensors")
    legacy = Steering.from_pretrained(tmp_path)
    with legacy.attach(model) as h:
        model(source)
    assert h.scales
    legacy.save_pretrained(tmp_path / "again")  # saved again, it is a folder of the current format
    assert json.loads((tmp_path / "again" / "steering_config.json").read_text())["format_version"] == FORMAT_VERSION
    assert same(Steering.from_pretrained(tmp_path / "again"), legacy)
    doc["weights_sha256"] = "0" * 64  # a digest in a format 1 file is not a format 1 file
    path.write_text(json.dumps(doc))
    with pytest.raises(ValueError, match=r"unknown fields \['weights_sha256'\]"):
        Steering.from_pretrained(tmp_path)


def test_a_half_precision_file_loads_as_float32_and_its_probe_checks_the_model(tmp_path):
    import hashlib

    from safetensors.torch import load_file, save_file

    model = Tiny()
    steering, source, _ = fitted(model, method="mean_shift")
    steering.save_pretrained(tmp_path)
    tensors = {k: v.half() for k, v in load_file(tmp_path / "steering.safetensors").items()}
    save_file(tensors, tmp_path / "steering.safetensors")
    path = tmp_path / "steering_config.json"
    doc = json.loads(path.read_text())
    doc["weights_sha256"] = hashlib.sha256((tmp_path / "steering.safetensors").read_bytes()).hexdigest()
    path.write_text(json.dumps(doc))
    loaded = Steering.from_pretrained(tmp_path)
    assert all(t.dtype == torch.float32 for t in loaded.state_dict().values())
    assert loaded.probes[""].dtype == torch.float32
    loaded.check_model(model)  # the fp16-rounded probe still recognises the model
    with pytest.raises(ValueError, match="other weights"):
        loaded.check_model(Tiny(seed=1))


def test_concurrent_saves_and_loads_of_one_folder_always_see_a_whole_steering(tmp_path):
    old, new = two_fits()
    old.save_pretrained(tmp_path)
    errors, seen = [], set()

    def save(steering):
        try:
            for _ in range(20):
                steering.save_pretrained(tmp_path)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    def load():
        try:
            for _ in range(40):
                seen.add(outcome(tmp_path, old, new))
        except Exception as e:  # noqa: BLE001
            errors.append(e)

    threads = [threading.Thread(target=save, args=(s,)) for s in (old, new)] + [threading.Thread(target=load)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and seen <= {"old", "new"}, (errors, seen)
    assert temporaries(tmp_path) == []


def test_the_pause_hook_refuses_a_step_it_does_not_know(tmp_path, monkeypatch):
    steering, _ = two_fits()
    monkeypatch.setenv(PAUSE_ENV, "halfway")
    with pytest.raises(ValueError, match=r"DSAS_SAVE_PAUSE='halfway' names no step.*stale_removed"):
        steering.save_pretrained(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_saving_into_a_file_is_refused(tmp_path):
    steering, _ = two_fits()
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match="save_directory .* is a file"):
        steering.save_pretrained(tmp_path / "f")
    with pytest.raises(TypeError, match="save_directory must be a folder path, got 3"):
        steering.save_pretrained(3)
    with pytest.raises(ValueError, match="save_directory is empty"):  # it wrote into the current folder
        steering.save_pretrained("")
    with pytest.raises(ValueError, match="cannot be created: a part of its path is a file"):
        steering.save_pretrained(tmp_path / "f" / "sub")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "steering_config.json").write_text("{}")
    (tmp_path / "d" / "steering.safetensors").mkdir()
    with pytest.raises(ValueError, match=r"steering.safetensors \(a folder, not a file\) missing"):
        Steering.from_pretrained(tmp_path / "d")


# ---- local paths first, the hub only for what looks like a repo id, never the network in tests -----

@pytest.fixture
def offline(monkeypatch):
    import socket

    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def no_network(*a, **k):
        raise AssertionError("the test touched the network")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)


def test_a_mistyped_path_offline_is_refused_at_once_naming_it(offline, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no steering folder 'typo/path' here \(.*typo/path does not exist\), and "
                                         r"the hub repo 'typo/path' is not in the local hub cache \(HF_HUB_OFFLINE"):
        Steering.from_pretrained("typo/path")


def test_paths_that_cannot_be_a_repo_id_never_reach_the_hub(offline, tmp_path):
    with pytest.raises(ValueError, match=r"no steering folder .*a/b/c.* not a hub repo id like 'user/name'"):
        Steering.from_pretrained(tmp_path / "a" / "b" / "c")
    (tmp_path / "file.json").write_text("{}")
    with pytest.raises(ValueError, match=r"is a file, not a steering folder"):
        Steering.from_pretrained(tmp_path / "file.json")
    with pytest.raises(ValueError, match="path is empty"):
        Steering.from_pretrained("")
    with pytest.raises(TypeError, match="path must be a steering folder or a hub repo id.*got None"):
        Steering.from_pretrained(None)


def test_a_path_object_is_a_local_folder_never_a_repo_id(tmp_path, monkeypatch):
    """Path("user/name") that is not here was sent to the hub (23 s of retries online before the error)."""
    from dsas_diffusion.core import artifact

    def no_hub(*a, **k):
        raise AssertionError("a Path went to the hub")

    monkeypatch.setattr(artifact, "_hub_files", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"no steering folder 'someuser/missing' here .*a Path is not a hub repo id"):
        Steering.from_pretrained(Path("someuser/missing"))


def test_hub_failures_become_one_clear_error(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    calls = []

    def unreachable(repo_id, filename, **kwargs):
        calls.append((repo_id, filename, kwargs))
        raise LocalEntryNotFoundError("Please check your connection and try again")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", unreachable)
    with pytest.raises(ValueError, match=r"no steering folder 'user/steering' here .* the hub repo 'user/steering' "
                                         r"is not reachable on the hub \(LocalEntryNotFoundError: Please check"):
        Steering.from_pretrained("user/steering", revision="v1")
    assert calls == [("user/steering", "steering_config.json", {"revision": "v1"})]


def test_a_hub_download_is_checked_like_a_folder(tmp_path, monkeypatch, offline):
    import huggingface_hub

    steering, _ = two_fits()
    steering.save_pretrained(tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    kwargs_seen = []

    def from_cache(repo_id, filename, **kwargs):
        kwargs_seen.append(kwargs)
        return str(tmp_path / "cache" / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", from_cache)
    assert same(Steering.from_pretrained("user/steering"), steering)
    assert kwargs_seen == [{"local_files_only": True}] * 2  # offline: the cache only


def test_a_hub_repo_without_the_steering_files_is_named_as_such(tmp_path, monkeypatch):
    from types import SimpleNamespace

    import huggingface_hub
    from huggingface_hub.errors import RemoteEntryNotFoundError

    steering, _ = two_fits()
    steering.save_pretrained(tmp_path / "cache")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)

    def only_a_config(repo_id, filename, **kwargs):
        if filename == "steering_config.json":
            return str(tmp_path / "cache" / filename)
        raise RemoteEntryNotFoundError("404 Entry Not Found", response=SimpleNamespace(headers={}, request=None))

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", only_a_config)
    with pytest.raises(ValueError, match=r"the hub repo 'user/model' holds no steering.safetensors, so it is not a "
                                         r"steering repo"):
        Steering.from_pretrained("user/model")
