"""The README's custom training loop runs as printed and learns (AUC above chance)."""
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_custom_loop_runs(tmp_path):
    text = README.read_text()
    match = re.search(r"<!-- custom-loop -->\n```python\n(.*?)```", text, re.S)
    assert match, "README lost its custom-loop snippet"
    script = tmp_path / "loop.py"
    script.write_text(match.group(1))
    env = {"CXRLAB_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "2", "PATH": "/usr/bin:/bin"}
    done = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    auc = float(re.search(r"macro AUC ([0-9.]+)", done.stdout).group(1))
    assert auc > 0.55, done.stdout
