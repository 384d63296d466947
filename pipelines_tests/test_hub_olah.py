"""Pulls a saved pipeline over real HTTP from a local Hub server (olah, a read-only Hub mirror) by its repo id.

The repository is a plain git repo in olah's mirrors folder; olah answers the Hub API (repo info, tree listing,
file resolution) from it, so huggingface_hub downloads exactly as from huggingface.co and caches the `trees/`
listing. Given a file list, diffusers 0.42 rejects components from third-party packages; `pixel_diffusers.hub`
lifts that for ours, and this test shows it over HTTP, and that without the fix the same pull fails.

The pulls run in a child process with a clean environment: the suite sets HF_HUB_OFFLINE=1 before import, and
huggingface_hub, diffusers and transformers each keep their own copies of the endpoint and offline settings.
"""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch

pytest.importorskip("olah")
if shutil.which("git") is None:
    pytest.skip("git is needed to build the mirrored repository", allow_module_level=True)

REPO_ID = "pixel-org/tiny-pixelhdm-olah"
STARTUP_TIMEOUT_S = 60

# The images compared: 2 steps at 32x32 from a fixed generator.
CALL = {"prompt": "a red circle", "height": 32, "width": 32, "num_inference_steps": 2, "output_type": "pt"}

# Run by the child process: argv = repo id, work folder, torch thread count, CALL as JSON.
PULL_SCRIPT = r"""
import json, sys
from pathlib import Path
import torch

repo_id, root, threads, call = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), json.loads(sys.argv[4])
torch.set_num_threads(threads)  # as in the parent, so that CPU kernels sum in the same order

import diffusers
from diffusers.pipelines import pipeline_utils
from huggingface_hub import constants

from pixel_diffusers import PixelHDMPipeline

def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**call, generator=torch.Generator().manual_seed(0)).images

results = {"offline": constants.HF_HUB_OFFLINE, "endpoint": constants.ENDPOINT, "images": {}, "classes": {}}
for loader in (PixelHDMPipeline, diffusers.DiffusionPipeline):
    cache = root / f"cache-{loader.__name__}"
    # First over HTTP, then again from what that pull cached (local_files_only reads the cached tree listing).
    for source, local_files_only in (("http", False), ("cache", True)):
        pipe = loader.from_pretrained(repo_id, revision="main", cache_dir=cache, local_files_only=local_files_only)
        key = f"{loader.__name__}/{source}"
        results["classes"][key] = type(pipe).__name__
        results["images"][key] = generate(pipe)
    results[f"trees/{loader.__name__}"] = len(list(cache.glob("models--*/trees/*.json")))

# Control: diffusers' own check, without our exemption, rejects the same pull.
pipeline_utils._get_custom_components_and_folders = pipeline_utils._get_custom_components_and_folders.__wrapped__
try:
    PixelHDMPipeline.from_pretrained(repo_id, revision="main", cache_dir=root / "cache-unpatched")
    results["unpatched_error"] = None
except ValueError as error:
    results["unpatched_error"] = str(error)

torch.save(results, root / "results.pt")
"""


def generate(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe(**CALL, generator=torch.Generator().manual_seed(0)).images


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def git(folder: Path, *args: str) -> None:
    """Runs git in `folder`, isolated from the user's and the system's git configuration (hooks, LFS filters)."""
    env = dict(
        os.environ,
        GIT_CONFIG_GLOBAL=os.devnull,
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="pixel_diffusers tests",
        GIT_AUTHOR_EMAIL="tests@example.com",
        GIT_COMMITTER_NAME="pixel_diffusers tests",
        GIT_COMMITTER_EMAIL="tests@example.com",
    )
    subprocess.run(["git", *args], cwd=folder, env=env, check=True, capture_output=True)


def http_status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return None


@pytest.fixture(scope="module")
def mirrored_pipeline(tmp_path_factory):
    """A tiny pipeline, its images, and the olah mirrors folder holding it as the git repo `REPO_ID` (branch main)."""
    from pixel_diffusers.testing import make_tiny_pixelhdm_pipeline

    pipe = make_tiny_pixelhdm_pipeline(seed=0)
    mirrors = tmp_path_factory.mktemp("olah") / "mirrors"
    repo = mirrors / "models" / REPO_ID
    pipe.save_pretrained(repo)
    # Plain git objects are enough: olah serves a blob that is not an LFS pointer as the file itself.
    git(repo, "init", "--quiet", "--initial-branch=main")
    git(repo, "add", "--all")
    git(repo, "commit", "--quiet", "--no-verify", "--message", "tiny PixelHDM pipeline")
    return generate(pipe), mirrors


@pytest.fixture(scope="module")
def olah_endpoint(mirrored_pipeline):
    """Serves the mirrors folder with olah in offline mode on a free localhost port; yields the endpoint URL."""
    _, mirrors = mirrored_pipeline
    root = mirrors.parent
    port = free_port()
    config = root / "olah.toml"
    config.write_text(
        "[basic]\n"
        f'host = "127.0.0.1"\nport = {port}\n'
        f"repos-path = {json.dumps(str(root / 'olah-cache'))}\n"
        f"mirrors-path = [{json.dumps(str(mirrors))}]\n"
        "[accessibility]\noffline = true\n"
    )
    endpoint = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-c", "from olah.server import cli; cli()", "--config", str(config)]
    command += ["--log-path", str(root / "logs")]
    with open(root / "olah.out", "wb") as log:
        # A process group of its own, so that olah's git helper processes are stopped with it.
        server = subprocess.Popen(command, cwd=root, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.monotonic() + STARTUP_TIMEOUT_S
            while http_status(f"{endpoint}/api/models/{REPO_ID}/revision/main") != 200:
                if server.poll() is not None or time.monotonic() > deadline:
                    output = (root / "olah.out").read_text(errors="replace")[-3000:]
                    pytest.fail(f"olah did not serve {REPO_ID} at {endpoint}:\n{output}")
                time.sleep(0.2)
            yield endpoint
        finally:
            # Signal the group while olah is not yet reaped, so that its id cannot belong to anyone else.
            if server.poll() is None:
                os.killpg(server.pid, signal.SIGTERM)
                try:
                    server.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    os.killpg(server.pid, signal.SIGKILL)
                    server.wait()


def pull_in_clean_process(endpoint: str, root: Path) -> dict:
    """Runs `PULL_SCRIPT` with huggingface_hub online, pointed at `endpoint`, and without tokens or proxies."""
    import pixel_diffusers

    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith(("HF_", "HUGGINGFACE_", "TRANSFORMERS_", "DIFFUSERS_"))
        and key.lower() not in ("http_proxy", "https_proxy", "all_proxy", "no_proxy")
    }
    package_root = str(Path(pixel_diffusers.__file__).resolve().parents[1])
    env.update(
        HF_ENDPOINT=endpoint,
        HF_HUB_OFFLINE="0",
        HF_HOME=str(root / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        DIFFUSERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
    )
    child = subprocess.run(
        [sys.executable, "-c", PULL_SCRIPT, REPO_ID, str(root), str(torch.get_num_threads()), json.dumps(CALL)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert child.returncode == 0, f"pull failed:\n{child.stderr[-6000:]}"
    return torch.load(root / "results.pt")


def test_pull_over_http_from_olah_gives_identical_images(mirrored_pipeline, olah_endpoint, tmp_path):
    expected, _ = mirrored_pipeline
    results = pull_in_clean_process(olah_endpoint, tmp_path)

    assert results["offline"] is False and results["endpoint"] == olah_endpoint
    for loader in ("PixelHDMPipeline", "DiffusionPipeline"):
        # huggingface_hub cached the tree listing: the case in which diffusers checks third-party components.
        assert results[f"trees/{loader}"] == 1
    assert sorted(results["images"]) == sorted(results["classes"]) and len(results["images"]) == 4
    for key, images in results["images"].items():
        assert results["classes"][key] == "PixelHDMPipeline", key
        torch.testing.assert_close(images, expected, atol=0, rtol=0, msg=lambda m: f"{key}: {m}")

    error = results["unpatched_error"]
    assert error is not None and "does not exist" in error and "pixel_diffusers" in error, error
