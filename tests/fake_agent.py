"""A stand-in for an agent CLI (never a real model), driven by behaviour.json in its cwd.

behaviour.json: {"reply": str, "exit": int, "stderr": str, "sleep": float,
"spawn_sleeper": bool, "bytes": int}. Every call is appended to calls.jsonl: the prompt
(last argument, or stdin with --stdin) and the environment it saw.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

behaviour = json.loads(Path("behaviour.json").read_text())
prompt = sys.stdin.read() if "--stdin" in sys.argv else sys.argv[-1]
with Path("calls.jsonl").open("a") as calls:
    calls.write(json.dumps({"prompt": prompt, "env": dict(os.environ), "pid": os.getpid()}) + "\n")
if behaviour.get("spawn_sleeper"):
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path("child.pid").write_text(str(child.pid))
time.sleep(behaviour.get("sleep", 0))
if behaviour.get("bytes"):
    sys.stdout.write("x" * behaviour["bytes"] + "\n")
sys.stdout.write(behaviour.get("reply", ""))
sys.stderr.write(behaviour.get("stderr", ""))
sys.exit(behaviour.get("exit", 0))
