"""The tests' warm command lines (tests/forkserver.py) see what a fresh interpreter sees: argv, working
directory, sys.path, environment, output and exit status; -9 kills them; and what they start through
sys.executable (tests/warm-python) runs too, warm for this repository's files and fresh otherwise."""
import json
import signal
import socket
import time

from conftest import ROOT, fork_server, run_cli, start_cli

PROBE = """import json, os, subprocess, sys
print(json.dumps({"argv": sys.argv, "cwd": os.getcwd(), "path0": sys.path[0], "value": os.environ.get("PROBE"),
                  "name": __name__}))
print("a line for stderr", file=sys.stderr)
if len(sys.argv) > 2:  # a command line of its own, as torchrun and the sensitivity runs start theirs
    inner = subprocess.run([sys.executable, *sys.argv[2:]], capture_output=True, text=True)
    print(json.dumps({"rc": inner.returncode, "out": inner.stdout[:60]}))
sys.exit(int(sys.argv[1]))
"""


def test_a_warm_command_line_sees_what_a_fresh_one_sees(tmp_path, monkeypatch):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    monkeypatch.setenv("PROBE", "값")
    warm, fresh = run_cli(str(probe), "3"), run_cli(str(probe), "3", fresh=True)
    assert warm.returncode == fresh.returncode == 3
    assert json.loads(warm.stdout) == json.loads(fresh.stdout) == {
        "argv": [str(probe), "3"], "cwd": str(ROOT), "path0": str(tmp_path), "value": "값", "name": "__main__"}
    assert warm.stderr.endswith("a line for stderr\n") and fresh.stderr == "a line for stderr\n"


def test_what_a_warm_command_line_starts_runs_too(tmp_path):
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE, encoding="utf-8")
    res = run_cli(str(probe), "0", "-m", "metrics", "--help")
    assert res.returncode == 0, res.stderr
    inner = json.loads(res.stdout.splitlines()[1])
    assert inner == {"rc": 0, "out": inner["out"]} and inner["out"].startswith("usage: python -m metrics")
    res = run_cli(str(probe), "0", "-c", "print('fresh')")  # not a file of ours: the real interpreter
    assert json.loads(res.stdout.splitlines()[1]) == {"rc": 0, "out": "fresh\n"}


def test_a_warm_command_line_dies_of_kill_9(tmp_path):
    probe = tmp_path / "sleeper.py"
    probe.write_text("import time\nprint('up', flush=True)\ntime.sleep(60)\n", encoding="utf-8")
    proc = start_cli(str(probe))
    deadline = time.time() + 30
    while proc.poll() is None and "up" not in proc.output()[0] and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=30) == -signal.SIGKILL


def test_a_client_that_hangs_up_mid_request_leaves_the_server_serving():
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(fork_server().socket)
    client.send(b'{"args": ')
    client.close()
    res = run_cli("-m", "metrics", "--help")
    assert res.returncode == 0 and res.stdout.startswith("usage: python -m metrics")
