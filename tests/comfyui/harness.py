"""Run a real ComfyUI headless on loopback and drive it through its HTTP API.

Used by the tests in this directory (see conftest.py for the fixtures). Standard library only, so
it runs in the project venv while ComfyUI itself runs in its own interpreter (COMFYUI_PYTHON).

    with ComfyServer(comfyui_path, python, base_dir, pack_dir=repo_root) as server:
        server.add_model("checkpoints", tiny_ckpt)
        result = server.run_prompt(prompt)           # API-format {"id": {"class_type", "inputs"}}
        assert result.ok, result.error_text()
        result.image_paths()                          # files SaveImage wrote
        server.custom_node_imports()                  # parsed "Import times for custom nodes:"

Every wait is bounded; the server is always shut down (context manager / stop()).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

PACK_DIR_NAME = "comfyui-hyper-sd"
MODEL_SUBDIRS = ("checkpoints", "loras", "controlnet", "diffusion_models", "vae", "clip", "embeddings")
STARTUP_TIMEOUT_S = 180.0
PROMPT_TIMEOUT_S = 300.0

# One line of ComfyUI's "Import times for custom nodes:" block, e.g.
# "   0.0 seconds (IMPORT FAILED): /tmp/base/custom_nodes/comfyui-hyper-sd"
_IMPORT_TIME_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?) seconds( \(IMPORT FAILED\))?: (.+?)\s*$")
# ComfyUI also prints "IMPORT FAILED: nodes_audio.py" for its own comfy_extras modules.
_IMPORT_FAILED_LINE = re.compile(r"IMPORT FAILED: (\S.*?)\s*$")


class ComfyError(RuntimeError):
    """The server failed to start, died, timed out, or rejected a request. Carries the log tail."""


@dataclass
class CustomNodeImport:
    seconds: float  # ComfyUI prints 0.1 s resolution
    failed: bool
    path: str

    @property
    def name(self) -> str:
        return Path(self.path).name


@dataclass
class PromptResult:
    prompt_id: str
    status: str  # "success" or "error" (from /history status.status_str)
    outputs: dict  # node id -> output dict (e.g. {"images": [...]})
    messages: list = field(default_factory=list)  # [[event, data], ...] from /history
    output_dir: Path | None = None
    seconds: float = 0.0  # wall time from POST /prompt to history entry

    @property
    def ok(self) -> bool:
        return self.status == "success"

    def error(self) -> dict | None:
        """The execution_error payload (exception_message, node_id, node_type, traceback)."""
        for event, data in self.messages:
            if event == "execution_error":
                return data
        return None

    def error_text(self) -> str:
        err = self.error()
        if err is None:
            return "" if self.ok else f"status {self.status!r}, messages {self.messages!r}"
        trace = "".join(err.get("traceback", []))
        return f"node {err.get('node_id')} ({err.get('node_type')}): {err.get('exception_type')}: " \
               f"{err.get('exception_message')}\n{trace}"

    def image_paths(self) -> list[Path]:
        """Files written by image-saving nodes (type "output"), resolved under the output dir."""
        paths = []
        for node_output in self.outputs.values():
            for image in node_output.get("images", []):
                if image.get("type") == "output" and self.output_dir is not None:
                    paths.append(self.output_dir / image.get("subfolder", "") / image["filename"])
        return paths


class PromptRejected(ComfyError):
    """POST /prompt answered 400: validation failed before execution."""

    def __init__(self, message: str, body: dict):
        super().__init__(message)
        self.body = body
        self.node_errors = body.get("node_errors", {})


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_base_dir(base_dir: Path, pack_dir: Path | None = None, pack_name: str = PACK_DIR_NAME) -> Path:
    """Create the folders ComfyUI expects under --base-directory; link the pack into custom_nodes."""
    base_dir = Path(base_dir)
    for sub in ("custom_nodes", "input", "output", "temp", "user"):
        (base_dir / sub).mkdir(parents=True, exist_ok=True)
    for sub in MODEL_SUBDIRS:
        (base_dir / "models" / sub).mkdir(parents=True, exist_ok=True)
    if pack_dir is not None:
        link = base_dir / "custom_nodes" / pack_name
        if not link.exists():
            link.symlink_to(Path(pack_dir).resolve(), target_is_directory=True)
    return base_dir


def parse_custom_node_imports(log: str) -> list[CustomNodeImport]:
    """Entries of every "Import times for custom nodes:" block in a ComfyUI log."""
    entries, in_block = [], False
    for line in log.splitlines():
        if "Import times for custom nodes:" in line:
            in_block = True
            continue
        if in_block:
            match = _IMPORT_TIME_LINE.match(line)
            if match is None:
                in_block = False
                continue
            entries.append(CustomNodeImport(float(match.group(1)), bool(match.group(2)), match.group(3)))
    return entries


def parse_import_failures(log: str) -> list[str]:
    """Names from "IMPORT FAILED: x" lines (ComfyUI's own comfy_extras/ modules, e.g. nodes_audio.py)."""
    return [m.group(1) for line in log.splitlines() if (m := _IMPORT_FAILED_LINE.search(line))]


class ComfyServer:
    """A ComfyUI process on 127.0.0.1 with its own base directory and captured log."""

    def __init__(self, comfyui_path, python: str, base_dir, pack_dir=None, port: int | None = None,
                 extra_args=(), startup_timeout: float = STARTUP_TIMEOUT_S, pack_name: str = PACK_DIR_NAME):
        self.comfyui_path = Path(comfyui_path)
        self.python = python
        self.base_dir = make_base_dir(Path(base_dir), pack_dir, pack_name)
        self.port = port or free_loopback_port()
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.log_path = self.base_dir / "comfyui.log"
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen | None = None
        self._log_file = None

    # -- lifecycle -------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def output_dir(self) -> Path:
        return self.base_dir / "output"

    def command(self) -> list[str]:
        return [self.python, str(self.comfyui_path / "main.py"), "--cpu", "--listen", "127.0.0.1",
                "--port", str(self.port), "--base-directory", str(self.base_dir),
                "--database-url", "sqlite:///:memory:", *self.extra_args]

    def start(self) -> "ComfyServer":
        if not (self.comfyui_path / "main.py").is_file():
            raise ComfyError(f"COMFYUI_PATH={self.comfyui_path} has no main.py: not a ComfyUI checkout")
        self._log_file = open(self.log_path, "wb")
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
        started = time.monotonic()
        self._proc = subprocess.Popen(self.command(), cwd=self.comfyui_path, stdout=self._log_file,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True)
        try:
            self._wait_ready(started)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - started
        return self

    def _wait_ready(self, started: float) -> None:
        while time.monotonic() - started < self.startup_timeout:
            if self._proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self._proc.returncode} during start-up\n"
                                 f"{self.log_tail()}")
            try:
                self._get("/system_stats", timeout=2.0)
                return
            except (OSError, urllib.error.URLError):
                time.sleep(0.25)
        raise ComfyError(f"ComfyUI not ready after {self.startup_timeout:.0f} s\n{self.log_tail()}")

    def stop(self, timeout: float = 15.0) -> None:
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=timeout)
            except ProcessLookupError:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # -- log -------------------------------------------------------------------------------------
    def log(self) -> str:
        if self._log_file is not None:
            self._log_file.flush()
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_tail(self, chars: int = 6000) -> str:
        return f"--- ComfyUI log tail ({self.log_path}) ---\n{self.log()[-chars:]}"

    def custom_node_imports(self) -> list[CustomNodeImport]:
        return parse_custom_node_imports(self.log())

    def pack_import(self, pack_name: str = PACK_DIR_NAME) -> CustomNodeImport | None:
        """The import-times entry for the pack, or None if ComfyUI never tried to import it."""
        for entry in self.custom_node_imports():
            if entry.name == pack_name:
                return entry
        return None

    def import_failures(self) -> list[str]:
        return parse_import_failures(self.log())

    # -- models ----------------------------------------------------------------------------------
    def add_model(self, subdir: str, source, name: str | None = None) -> str:
        """Symlink a model file into models/<subdir>/; returns the name to use in a prompt."""
        source = Path(source).resolve()
        name = name or source.name
        target = self.base_dir / "models" / subdir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_symlink() or target.exists():
            target.unlink()
        target.symlink_to(source)
        return name

    # -- HTTP ------------------------------------------------------------------------------------
    def _get(self, path: str, timeout: float = 30.0):
        with urllib.request.urlopen(self.url + path, timeout=timeout) as response:
            return json.loads(response.read())

    def _post(self, path: str, payload: dict, timeout: float = 30.0):
        request = urllib.request.Request(self.url + path, data=json.dumps(payload).encode(),
                                         headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(request, timeout=timeout) as response:
            body = response.read()
        return json.loads(body) if body.strip() else {}

    def object_info(self, node_class: str | None = None) -> dict:
        info = self._get("/object_info" + (f"/{node_class}" if node_class else ""), timeout=60.0)
        return info

    def queue_prompt(self, prompt: dict) -> str:
        """POST /prompt; returns the prompt id. Raises PromptRejected with node_errors on 400."""
        try:
            body = self._post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        except urllib.error.HTTPError as err:
            text = err.read().decode(errors="replace")
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = {"error": text}
            raise PromptRejected(f"ComfyUI rejected the prompt (HTTP {err.code}): "
                                 f"{json.dumps(parsed, indent=1)[:4000]}", parsed) from None
        return body["prompt_id"]

    def wait_for(self, prompt_id: str, timeout: float = PROMPT_TIMEOUT_S, poll: float = 0.2) -> dict:
        """Poll /history/<id> until the entry is complete; returns the entry."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise ComfyError(f"ComfyUI died while running prompt {prompt_id}\n{self.log_tail()}")
            entry = self._get(f"/history/{prompt_id}").get(prompt_id)
            if entry is not None and entry.get("status", {}).get("completed") is not None:
                return entry
            time.sleep(poll)
        raise ComfyError(f"prompt {prompt_id} not finished after {timeout:.0f} s\n{self.log_tail()}")

    def run_prompt(self, prompt: dict, timeout: float = PROMPT_TIMEOUT_S) -> PromptResult:
        """Queue an API-format prompt and wait for it. Check ``result.ok`` / ``result.error_text()``."""
        started = time.monotonic()
        prompt_id = self.queue_prompt(prompt)
        entry = self.wait_for(prompt_id, timeout)
        status = entry.get("status", {})
        return PromptResult(prompt_id=prompt_id, status=status.get("status_str", "unknown"),
                            outputs=entry.get("outputs", {}), messages=status.get("messages", []),
                            output_dir=self.output_dir, seconds=time.monotonic() - started)

    def free_memory(self) -> None:
        """Ask ComfyUI to unload models (between tests that load different checkpoints)."""
        self._post("/free", {"unload_models": True, "free_memory": True})


def _main(argv: list[str]) -> int:
    """Manual check: python tests/comfyui/harness.py COMFYUI_PATH PYTHON BASE_DIR [PACK_DIR]."""
    comfyui_path, python, base_dir = argv[:3]
    pack_dir = argv[3] if len(argv) > 3 else None
    with ComfyServer(comfyui_path, python, base_dir, pack_dir=pack_dir) as server:
        print(f"ready in {server.startup_seconds:.1f} s on {server.url}")
        print("nodes:", len(server.object_info()))
        for entry in server.custom_node_imports():
            print(entry)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))


def core_txt2img_prompt(ckpt_name: str, *, text: str = "a photo of a cat", negative: str = "",
                        width: int = 64, height: int = 64, seed: int = 0, steps: int = 1, cfg: float = 1.0,
                        sampler_name: str = "euler", scheduler: str = "normal", denoise: float = 1.0,
                        filename_prefix: str = "hypersd_test") -> dict:
    """API-format core txt2img graph: CheckpointLoaderSimple -> CLIPTextEncode x2 -> EmptyLatentImage
    -> KSampler -> VAEDecode -> SaveImage. Node ids: "ckpt", "pos", "neg", "latent", "sampler",
    "decode", "save" (so tests can patch e.g. prompt["sampler"]["inputs"]["model"])."""
    return {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["ckpt", 1]}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["ckpt", 1]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "sampler": {"class_type": "KSampler", "inputs": {
            "model": ["ckpt", 0], "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler_name, "scheduler": scheduler,
            "denoise": denoise}},
        "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sampler", 0], "vae": ["ckpt", 2]}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": filename_prefix}},
    }
