"""`python -m cluster.down`: bad input in one line; the SSH command it runs on each worker is Ray's own form.
Its real run (ray down, then `ray stop` on a worker over SSH) is in tests/test_ray_up_onprem.py."""
import subprocess
import sys
from pathlib import Path

import yaml

from cluster.down import ssh_command

ROOT = Path(__file__).resolve().parents[1]


def test_bad_files_are_one_line_errors(tmp_path):
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    (tmp_path / "broken.yaml").write_text("provider: [\n")
    for name, reason in (("missing.yaml", "cannot read"), ("list.yaml", "not a Ray cluster config"),
                         ("broken.yaml", "not YAML")):
        done = subprocess.run([sys.executable, "-m", "cluster.down", str(tmp_path / name)], cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and done.stdout == "", done
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {tmp_path / name}: {reason}"), lines


def test_ssh_command_uses_the_files_user_key_and_login_shell():
    config = yaml.safe_load((ROOT / "cluster" / "onprem.yaml").read_text())
    cmd = ssh_command(config, "10.0.0.11", "ray stop")
    assert cmd[0] == "ssh" and cmd[cmd.index("-i") + 1].endswith("/.ssh/id_ed25519")
    assert "ubuntu@10.0.0.11" in cmd and "BatchMode=yes" in cmd
    assert cmd[-1] == "bash --login -c -i 'true && source ~/.bashrc && ray stop'"
