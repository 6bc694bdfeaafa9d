"""Where llama.cpp's tools are, when they are built: a benchmark peer and test oracle, never a
runtime dependency. $LLAMACPP_BIN, else where ../shared/tools/llamacpp-peer.sh builds them
($LLAMACPP_PEER_DIR, default ~/.cache/llamacpp-peer)."""
import json
import os
import subprocess
from pathlib import Path


def bin_folder() -> Path:
    peer = Path(os.environ.get("LLAMACPP_PEER_DIR") or Path.home() / ".cache" / "llamacpp-peer")
    return Path(os.environ.get("LLAMACPP_BIN") or peer / "llama.cpp" / "build" / "bin")


def find(tool: str) -> Path | None:
    path = bin_folder() / tool
    return path if path.exists() else None


def bench(gguf: Path, threads: int, prompt: int, decode: int, repeat: int) -> tuple[float, float] | None:
    """(prefill tok/s, decode tok/s) that llama-bench measures on the same file and threads (its
    mean over `repeat` runs), or None when it is not built or fails."""
    tool = find("llama-bench")
    if tool is None:
        return None
    done = subprocess.run([str(tool), "-m", str(gguf), "-t", str(threads), "-p", str(prompt), "-n", str(decode),
                           "-r", str(repeat), "-o", "json"], capture_output=True, text=True)
    if done.returncode != 0:
        return None
    runs = json.loads(done.stdout)
    speed = {("prefill" if r["n_prompt"] else "decode"): r["avg_ts"] for r in runs}
    return speed.get("prefill"), speed.get("decode")
