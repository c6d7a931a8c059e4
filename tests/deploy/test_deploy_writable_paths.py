"""deploy/k8s under readOnlyRootFilesystem: every path a container writes lies on one of its writable mounts.

Two checks. The manifests against WRITES, what each container writes, found in the code and by running it (native
libraries' writes too: ONNX Runtime's and OpenVINO's, seen under a read-only root and with strace). And the real
programs (the init container's prepare, the service, a torchrun training run), run here with each writable mount
stood in for by a folder and a Python audit hook recording every write (write_audit/sitecustomize.py): each write,
mapped back to the container's paths, must land on a writable mount of that container in the manifest.
"""
from __future__ import annotations

import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import httpx
import numpy as np
import pytest
import yaml
from compose_yaml import ROOT, load_compose
from PIL import Image

from tests.service.conftest import free_port

K8S = ROOT / "deploy" / "k8s"
ENTRYPOINT = ROOT / "deploy" / "entrypoint.py"
AUDIT_HOOK = Path(__file__).parent / "write_audit"

# What each container writes outside its image ("$HOME": the container's HOME), and who writes it.
WRITES = {
    "prepare": {
        "/models/convnext_tiny/1": "the export (runtime/repository.py), and the download cache <repository>/.cache",
        "/tmp/torchinductor_convnext": "torch creates its inductor cache folder on every export, compiled or not",
        "/tmp/.ses": "ONNX Runtime's telemetry session id, hard-coded to /tmp (native; the parity check)",
        "$HOME/.cache/Microsoft/DeveloperTools/.onnxruntime": "ONNX Runtime's telemetry device id (native)",
    },
    "service": {
        "/models/convnext_tiny/1/.engine-x": "TensorRT engines and timing caches, ORT's TensorRT caches",
        "/tmp/upload": "the multipart parser spools each file part over 1 MiB to a temporary file (Starlette)",
        "/tmp/.ses": "ONNX Runtime's telemetry session id (native)",
        "/tmp/tensorrt": "TensorRT's temporary files (IRuntime.tempfile_path defaults to /tmp)",
        "$HOME/.cache/Microsoft/DeveloperTools/.onnxruntime": "ONNX Runtime's telemetry device id (native)",
        "$HOME/intel/openvino_ga_cid": "OpenVINO's telemetry client id",
        "$HOME/.nv/ComputeCache": "the CUDA driver's JIT cache (native)",
    },
    "torchrun": {
        "/runs/in1k": "checkpoints, the config and the log of the run",
        "/tmp/torchelastic_x": "torchrun's per-run folder (torch.distributed.elastic)",
        "/tmp/pymp-x": "multiprocessing's folder for the DataLoader workers' sockets",
        "/tmp/torchinductor_convnext": "torch.compile's inductor and Triton caches",
        "/dev/shm/torch_x": "DataLoader workers' shared-memory batches",
        "$HOME/.nv/ComputeCache": "the CUDA driver's JIT cache (native)",
    },
}


def containers() -> dict[str, dict]:
    """Every container and init container of the k8s manifests, by name."""
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text()):
            pod = (document or {}).get("spec", {}).get("template", {}).get("spec", {})
            for container in pod.get("initContainers", []) + pod.get("containers", []):
                found[container["name"]] = container
    return found


def writable_mounts(container: dict) -> list[PurePosixPath]:
    return [PurePosixPath(m["mountPath"]) for m in container.get("volumeMounts", []) if not m.get("readOnly")]


def home(container: dict) -> str:
    """HOME in the container: its env's, else the image user's (the manifests run as the image's UID 10001)."""
    image_home = re.search(r"useradd .*--home-dir (\S+)", (ROOT / "Dockerfile").read_text()).group(1)
    return next((e["value"] for e in container.get("env", []) if e["name"] == "HOME"), image_home)


def on_writable_mount(path: str, container: dict) -> bool:
    """/dev/null and /dev/shm are the runtime's own mounts in every container; the rest must be on the manifest's."""
    target = PurePosixPath(path)
    return path == "/dev/null" or target.is_relative_to("/dev/shm") or any(
        target.is_relative_to(mount) for mount in writable_mounts(container))


def test_every_container_has_a_read_only_root_and_declares_what_it_writes():
    found = containers()
    assert set(found) == set(WRITES), "a container without an entry in WRITES: find what it writes"
    for name, container in found.items():
        assert container["securityContext"]["readOnlyRootFilesystem"] is True, name


@pytest.mark.parametrize("name,path", [(name, path) for name, paths in WRITES.items() for path in paths])
def test_each_path_a_container_writes_is_on_a_writable_mount(name, path):
    container = containers()[name]
    resolved = path.replace("$HOME", home(container))
    assert on_writable_mount(resolved, container), f"{name} writes {resolved} ({WRITES[name][path]}), on no " \
        f"writable mount of it ({', '.join(map(str, writable_mounts(container)))}): the write fails (read-only root)"


def compose_writable_mounts(service: dict) -> list[PurePosixPath]:
    """A compose service's writable paths: its tmpfs mounts and its volumes not mounted read-only."""
    volumes = [v.split(":") for v in service.get("volumes", [])]
    return [PurePosixPath(t.split(":")[0]) for t in service.get("tmpfs", [])] + \
        [PurePosixPath(v[1]) for v in volumes if "ro" not in v[2:]]


@pytest.mark.parametrize("name,path", [(name, path) for name in ("prepare", "service") for path in WRITES[name]])
def test_compose_runs_the_same_containers_read_only_with_the_same_writable_paths(name, path):
    """docker-compose.yml hardens prepare and the service as the manifests do: read-only root, no capability, no
    privilege gain, a memory limit; and each path the container writes is on one of its tmpfs mounts or volumes."""
    service = load_compose(ROOT / "docker-compose.yml")["services"][name]
    assert service["read_only"] is True and service["cap_drop"] == ["ALL"], name
    assert service["security_opt"] == ["no-new-privileges:true"] and service["mem_limit"], name
    resolved = PurePosixPath(path.replace("$HOME", home({})))
    mounts = compose_writable_mounts(service)
    assert any(resolved.is_relative_to(mount) for mount in mounts), \
        f"compose {name} writes {resolved} ({WRITES[name][path]}) on no writable path ({', '.join(map(str, mounts))})"


# ---- the real programs, audited ----

class Mounts:
    """Host folders standing in for a container's writable paths: the process is pointed at them (repository, TMPDIR,
    HOME, output), and each write it records is mapped back to the container's path."""

    def __init__(self, root: Path, container: dict, paths: dict[str, str], host: dict[str, Path]):
        self.container, self.log = container, root / "writes.log"
        self.host = {name: host.get(name, root / name) for name in paths}
        for folder in self.host.values():
            folder.mkdir(parents=True, exist_ok=True)
        self.container_path = {str(self.host[name]): path for name, path in paths.items()}

    def env(self, **settings: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("CONVNEXT_") and k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
        env.update(settings, PYTHONPATH=os.pathsep.join(filter(None, [str(AUDIT_HOOK), os.environ.get("PYTHONPATH")])),
                   WRITE_AUDIT_LOG=str(self.log), TMPDIR=str(self.host["tmp"]), HOME=str(self.host["home"]),
                   # The image's packages are compiled when pip installs them; a .pyc write under the read-only /app
                   # fails silently by design (importlib), so the checkout's own are left out here.
                   PYTHONDONTWRITEBYTECODE="1")
        return env

    def written(self) -> list[tuple[str, str]]:
        """(event, path in the container) of every write recorded."""
        writes = []
        for line in self.log.read_text().splitlines():
            _pid, event, path = line.split("\t")
            for host, inside in self.container_path.items():
                if path == host or path.startswith(host + "/"):
                    path = inside + path[len(host):]
                    break
            writes.append((event, path))
        return writes

    def assert_all_on_writable_mounts(self) -> list[str]:
        writes = self.written()
        outside = sorted({f"{path} ({event})" for event, path in writes if not on_writable_mount(path, self.container)})
        assert not outside, f"writes outside the writable mounts {writable_mounts(self.container)}: {outside[:10]}"
        return [path for _, path in writes]


def container_mounts(root: Path, name: str, host_tmp: Path | None = None, **paths: str) -> Mounts:
    """The container's writable paths as folders under `root` (its /tmp in `host_tmp` when given)."""
    container = containers()[name]
    return Mounts(root, container, {"tmp": "/tmp", "home": home(container), **paths},
                  {} if host_tmp is None else {"tmp": host_tmp})


@pytest.fixture()
def short_tmp() -> Iterator[Path]:
    """A TMPDIR with a short path: multiprocessing's listener sockets live in it, and a socket's path over 107 bytes
    cannot be bound. Under a pytest-xdist worker's longer tmp_path, the DataLoader worker's batch never reached the
    training process (its file descriptor is passed through such a socket) and the run hung to its timeout."""
    folder = Path(tempfile.mkdtemp(prefix="wa-"))
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Mounts:
    """The init container's `entrypoint.py prepare`, audited: an official-format checkpoint downloaded and exported
    (fp32: random weights may miss fp16's parity threshold, and fp16 writes where fp32 does)."""
    import torch

    from model import create_model

    root = tmp_path_factory.mktemp("prepare")
    mounts = container_mounts(root, "prepare", models="/models")
    checkpoint = root / "checkpoint" / "convnext_atto.pth"
    checkpoint.parent.mkdir()
    torch.save({"model": create_model("convnext_atto").state_dict()}, checkpoint)
    env = mounts.env(CONVNEXT_REPOSITORY=str(mounts.host["models"]), CONVNEXT_MODEL="convnext_tiny",
                     CONVNEXT_ARCHITECTURE="convnext_atto", CONVNEXT_CHECKPOINT=checkpoint.as_uri(),
                     CONVNEXT_EXPORT_PRECISIONS="fp32", CONVNEXT_EXPORT_ARGS="--input-size 32")
    result = subprocess.run([sys.executable, str(ENTRYPOINT), "prepare"], env=env, cwd=ROOT, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    return mounts


def test_prepare_writes_only_to_its_writable_mounts(prepared):
    paths = prepared.assert_all_on_writable_mounts()
    assert "/models/convnext_tiny/1" in paths  # staged, then renamed into place (runtime/repository.py)
    assert any(p.startswith("/models/.cache/") for p in paths)
    assert any(p.startswith("/tmp/torchinductor_") for p in paths)  # WRITES["prepare"]: why /tmp must be writable


def png_over_1_mib() -> bytes:
    noise = np.random.default_rng(0).integers(0, 256, (900, 900, 3), dtype=np.uint8)  # incompressible: ~2.4 MB
    buffer = io.BytesIO()
    Image.fromarray(noise).save(buffer, "PNG")
    assert len(buffer.getvalue()) > 1024 * 1024
    return buffer.getvalue()


def test_the_service_writes_only_to_its_writable_mounts(prepared, tmp_path):
    """`entrypoint.py serve` on the prepared repository, engine auto (ONNX Runtime and OpenVINO both load): a photo
    over 1 MiB as a multipart file (spooled to a temporary file), a raw one, a gRPC call, /metrics, SIGTERM."""
    import tritonclient.grpc as triton_grpc

    mounts = container_mounts(tmp_path, "service")
    mounts.container_path[str(prepared.host["models"])] = "/models"
    port, grpc_port = free_port(), free_port()
    env = mounts.env(CONVNEXT_REPOSITORY=str(prepared.host["models"]), CONVNEXT_MODEL="convnext_tiny",
                     CONVNEXT_HOST="127.0.0.1", CONVNEXT_PORT=str(port), CONVNEXT_GRPC_PORT=str(grpc_port),
                     CONVNEXT_ENGINE="auto", CONVNEXT_PROVIDER="cpu", CONVNEXT_PRECISION="fp32",
                     CONVNEXT_INTRA_OP_THREADS="1", CONVNEXT_PREPROCESS_WORKERS="1", CONVNEXT_WARMUP_RUNS="1")
    log = tmp_path / "service.log"
    process = subprocess.Popen([sys.executable, str(ENTRYPOINT), "serve"], env=env, cwd=ROOT,
                               stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while not _ready(url):
            assert process.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        photo = png_over_1_mib()
        assert httpx.post(f"{url}/classify", files=[("files", ("noise.png", photo))], timeout=60).status_code == 200
        assert httpx.post(f"{url}/classify", content=photo, headers={"content-type": "image/png"},
                          timeout=60).status_code == 200
        with triton_grpc.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
            tensor = triton_grpc.InferInput("input", [1, 3, 32, 32], "FP32")
            tensor.set_data_from_numpy(np.zeros((1, 3, 32, 32), dtype=np.float32))
            client.infer("convnext_tiny", [tensor])
        assert httpx.get(f"{url}/metrics", timeout=30).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=90)
    paths = mounts.assert_all_on_writable_mounts()
    assert any(p.startswith("/tmp/") for p in paths), "the multipart upload over 1 MiB was not spooled to /tmp"


def _ready(url: str) -> bool:
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.TransportError:
        return False


def test_a_torchrun_training_run_writes_only_to_the_jobs_writable_mounts(tmp_path, short_tmp):
    """The Job's command (torchrun, one process per GPU, DataLoader workers) on the offline demo data, one step
    (evaluation writes where training does: checkpoints into the output folder)."""
    mounts = container_mounts(tmp_path, "torchrun", short_tmp, runs="/runs")
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=1", "--node-rank=0",
               "--master-addr=127.0.0.1", f"--master-port={free_port()}",
               "-m", "training", "--preset", "demo", "--output", str(mounts.host["runs"] / "demo"), "--epochs", "1",
               "--max-steps-per-epoch", "1", "--disable-eval", "--workers", "1", "--quiet"]
    result = subprocess.run(command, env=mounts.env(), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    paths = mounts.assert_all_on_writable_mounts()
    assert any(p.startswith("/runs/demo/") for p in paths)
    assert any(p.startswith("/tmp/torchelastic_") for p in paths)  # WRITES["torchrun"]: why /tmp must be writable
    assert any(p.startswith("/tmp/pymp-") for p in paths)
