"""Release download through huggingface_hub: a local fake hub (HF_ENDPOINT on 127.0.0.1) and
offline mode. Each case runs in a subprocess because huggingface_hub reads HF_* at import time."""
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FILE = "Hyper-SD15-2steps-lora.safetensors"
COMMIT = "0123456789abcdef0123456789abcdef01234567"

SCRIPT = """
import json, sys
sys.path.insert(0, {root!r})
import releases as rel
try:
    print(json.dumps({{"path": rel.download_release({file!r}, {target!r})}}))
except ValueError as e:
    print(json.dumps({{"error": str(e)}}))
"""


def _payload() -> bytes:
    import torch
    from safetensors.torch import save

    return save({"lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.arange(6.0).reshape(3, 2)})


class _FakeHub(http.server.BaseHTTPRequestHandler):
    payload = b""
    requests: list = []
    truncate = False  # send half the file, then drop the connection

    def _headers(self):
        etag = hashlib.sha256(self.payload).hexdigest()
        if self.path != f"/ByteDance/Hyper-SD/resolve/main/{FILE}":
            self.send_response(404)
            self.send_header("X-Error-Code", "EntryNotFound")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return False
        self.send_response(200)
        self.send_header("X-Repo-Commit", COMMIT)
        self.send_header("ETag", f'"{etag}"')
        self.send_header("Content-Length", str(len(self.payload)))
        self.end_headers()
        return True

    def do_HEAD(self):
        self.requests.append(("HEAD", self.path))
        self._headers()

    def do_GET(self):
        self.requests.append(("GET", self.path))
        if self._headers():
            self.wfile.write(self.payload[: len(self.payload) // 2] if self.truncate else self.payload)
            self.close_connection = self.truncate

    def log_message(self, *args):
        pass


def _run(target: Path, env_extra: dict, file: str = FILE) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(env_extra, HF_HOME=str(target.parent / "hf_home"))
    code = SCRIPT.format(root=str(ROOT), file=file, target=str(target))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.fixture
def fake_hub():
    _FakeHub.payload, _FakeHub.requests, _FakeHub.truncate = _payload(), [], False
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_download_from_local_endpoint_lands_in_loras_folder(tmp_path, fake_hub):
    loras = tmp_path / "loras"
    result = _run(loras, {"HF_ENDPOINT": fake_hub})
    assert "error" not in result, result
    path = Path(result["path"])
    assert path == loras / FILE and path.read_bytes() == _FakeHub.payload
    assert ("GET", f"/ByteDance/Hyper-SD/resolve/main/{FILE}") in _FakeHub.requests
    assert _tree(loras) == [FILE]  # no .cache/huggingface bookkeeping (.lock, .metadata) left behind


def _tree(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _user_loras(tmp_path: Path) -> Path:
    """A loras folder with the user's own files, one inside a .cache folder the download also uses."""
    loras = tmp_path / "loras"
    (loras / ".cache" / "mine").mkdir(parents=True)
    (loras / "my_lora.safetensors").write_bytes(b"mine")
    (loras / ".cache" / "mine" / "note.txt").write_text("mine")
    return loras


def test_offline_gives_one_clear_error_naming_file_and_place(tmp_path):
    loras = tmp_path / "loras"
    result = _run(loras, {"HF_HUB_OFFLINE": "1"})
    msg = result["error"]
    assert msg.startswith(f"release: could not download {FILE} from ByteDance/Hyper-SD")
    assert f"https://huggingface.co/ByteDance/Hyper-SD/resolve/main/{FILE}" in msg
    assert str(loras / FILE) in msg
    assert not loras.exists()  # the download made the folder and its .lock: both gone again


def test_failed_download_leaves_the_loras_folder_as_it_was(tmp_path, fake_hub):
    """Issue 13 item 10: an offline or broken download left .cache/huggingface/download/*.lock (and
    .incomplete) in the loras folder; the user's own files, even inside .cache, stay."""
    loras = _user_loras(tmp_path)
    before = _tree(loras)
    assert "error" in _run(loras, {"HF_HUB_OFFLINE": "1"})
    assert _tree(loras) == before
    _FakeHub.truncate = True  # the connection drops mid-file (huggingface_hub retries 5 times, ~5 s)
    result = _run(loras, {"HF_ENDPOINT": fake_hub})
    assert "RemoteProtocolError" in result["error"] and str(loras / FILE) in result["error"]
    assert _tree(loras) == before


def test_file_missing_on_hub_error(tmp_path, fake_hub):
    other = "Hyper-SD15-4steps-lora.safetensors"  # the fake hub answers 404 for it
    result = _run(tmp_path / "loras", {"HF_ENDPOINT": fake_hub}, file=other)
    assert result["error"].startswith(f"release: could not download {other}")
    assert str(tmp_path / "loras" / other) in result["error"]


def test_non_release_file_is_refused(tmp_path):
    result = _run(tmp_path / "loras", {"HF_HUB_OFFLINE": "1"}, file="../../etc/passwd")
    assert "not an official Hyper-SD release file" in result["error"]
