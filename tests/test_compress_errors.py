"""Bad input, interrupts and a full disk: one error line, exit status 2, nothing left behind."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest

from compression.synthetic import build_family
from server.cli import main
from tests.conftest import ROOT, member_args, run_cli


def assert_clean_failure(capsys, argv, out, expect):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err
    for word in expect:
        assert word in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


@pytest.fixture
def copy_family(family, tmp_path):
    def copy():
        dst = {}
        for name, path in family.items():
            dst[name] = tmp_path / "members" / name
            shutil.copytree(path, dst[name])
        return dst
    return copy


def edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def test_missing_directory(family, tmp_path, capsys):
    out = tmp_path / "art"
    args = ["compress", "--out", str(out), *member_args(family), f"ghost={tmp_path / 'nope'}"]
    assert_clean_failure(capsys, args, out, ["not found", "nope"])


def test_checkpoint_without_safetensors(family, copy_family, tmp_path, capsys):
    m = copy_family()
    for f in m["code"].glob("*.safetensors*"):
        f.unlink()
    (m["code"] / "pytorch_model.bin").write_bytes(b"pickle")
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), *member_args(m)], out,
                         ["no *.safetensors", "pytorch_model.bin"])


def test_member_without_tokenizer_files(copy_family, tmp_path, capsys):
    m = copy_family()
    (m["code"] / "tokenizer.json").unlink()
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), *member_args(m)], out,
                         ["member 'code'", "no tokenizer files"])


@pytest.mark.parametrize("field,value,expect", [
    ("model_type", "mistral", ["architecture differs", "math", "code"]),
    ("vocab_size", 999, ["vocabulary differs", "math", "code"]),
])
def test_members_differ_in_config(copy_family, tmp_path, capsys, field, value, expect):
    m = copy_family()
    edit_config(m["code"], **{field: value})
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), *member_args(m)], out, expect)


def test_members_differ_in_shape(family, tmp_path, capsys):
    other = build_family(tmp_path / "wide", ["wide"], intermediate=192, seed=5)
    out = tmp_path / "art"
    args = ["compress", "--out", str(out), f"math={family['math']}", f"wide={other['wide']}"]
    assert_clean_failure(capsys, args, out, ["shape of model.layers.0.mlp.", "math", "wide", "192"])


def test_corrupt_safetensors(copy_family, tmp_path, capsys):
    m = copy_family()
    f = m["math"] / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:40] = b"\x00garbage-not-json\xff" + b"\x00" * 14
    f.write_bytes(bytes(data))
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), *member_args(m)], out, ["corrupt", "math"])


def test_truncated_safetensors(copy_family, tmp_path, capsys):
    m = copy_family()
    f = next(m["code"].glob("model-00002-of-*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1000])
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), *member_args(m)], out, ["truncated", f.name])


@pytest.mark.parametrize("rate", ["-0.1", "1.5", "nan"])
def test_rate_outside_range(family, tmp_path, capsys, rate):
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), "--rate", rate, *member_args(family)], out,
                         ["--rate"])


def test_bad_member_spec(family, tmp_path, capsys):
    out = tmp_path / "art"
    assert_clean_failure(capsys, ["compress", "--out", str(out), "math", f"code={family['code']}"], out,
                         ["NAME=PATH"])
    assert_clean_failure(capsys, ["compress", "--out", str(out), f"math={family['math']}"], out,
                         ["at least two"])


def test_existing_output_without_force(family, tmp_path, capsys):
    out = tmp_path / "art"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code = main(["compress", "--out", str(out), "--quiet", *member_args(family)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "--force" in err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_output_inside_a_member_is_refused(family, tmp_path, capsys):
    out = family["math"] / "art"
    code = main(["compress", "--out", str(out), "--force", "--quiet", *member_args(family)])
    assert code == 2 and "overlaps" in capsys.readouterr().err
    assert not out.exists()


def test_export_unknown_branch_and_existing_out(family, tmp_path, capsys):
    art = tmp_path / "art"
    assert main(["compress", "--out", str(art), "--rate", "1", "--quiet", *member_args(family)]) == 0
    capsys.readouterr()
    out = tmp_path / "exp"
    assert_clean_failure(capsys, ["export", str(art), "nobody", str(out)], out, ["unknown branch", "nobody", "math"])
    out.mkdir()
    assert main(["export", str(art), "math", str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert main(["export", str(art), "math", str(out), "--force", "--quiet"]) == 0
    assert (out / "model.safetensors").is_file()


def test_usage_error_is_one_line_exit_2():
    r = run_cli("compress", "--rate", "0.5")
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def big_family(tmp_path_factory):
    """Many layers of moderate width: far larger than any one tensor."""
    return build_family(tmp_path_factory.mktemp("big"), ["a", "b", "c"], hidden=384, intermediate=1024,
                        layers=16, heads=6, kv_heads=2, seed=7)


def leftovers(parent, name):
    return [p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]


def test_ctrl_c_leaves_nothing(big_family, tmp_path):
    out = tmp_path / "art"
    env_cmd = [sys.executable, "-m", "server.cli", "compress", "--out", str(out), "--rate", "0.9", "--backend",
               "fbpca", *member_args(big_family)]
    # Ctrl-C as a terminal sends it: a job a shell started in the background (as CI may run the suite) inherits
    # SIGINT ignored, and so would this child, which then never sees the signal.
    proc = subprocess.Popen(env_cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 60
    while not leftovers(tmp_path, "art") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert leftovers(tmp_path, "art"), "compress never started writing"
    time.sleep(0.3)  # mid-run: the whole job takes several seconds
    assert proc.poll() is None
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    assert leftovers(tmp_path, "art") == []


def test_full_disk_leaves_nothing(big_family, tmp_path):
    """RLIMIT_FSIZE makes writes past 4 MB fail like a full disk would (EFBIG instead of ENOSPC)."""
    out = tmp_path / "art"
    script = (
        "import resource, sys; resource.setrlimit(resource.RLIMIT_FSIZE, (4_000_000, 4_000_000));"
        "from server.cli import main; sys.exit(main(sys.argv[1:]))"
    )
    r = subprocess.run([sys.executable, "-c", script, "compress", "--out", str(out), "--rate", "1", "--quiet",
                        *member_args(big_family)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert "nothing was written" in r.stderr
    assert leftovers(tmp_path, "art") == []


# VmHWM is this process's own peak; ru_maxrss would inherit the forking test process's.
PEAK_RSS = (
    "import re, sys; from server.cli import main; code = main(sys.argv[1:]);"
    "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) * 1024);"
    "sys.exit(code)"
)


def peak_rss(args) -> int:
    r = subprocess.run([sys.executable, "-c", PEAK_RSS, *map(str, args)], cwd=ROOT, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    return int(r.stdout.strip().splitlines()[-1])


def test_peak_memory_does_not_grow_with_family_size(big_family, tmp_path):
    small = build_family(tmp_path / "small", ["a", "b", "c"], hidden=384, intermediate=1024, layers=2, heads=6,
                         kv_heads=2, seed=7)
    family_bytes = sum(f.stat().st_size for p in big_family.values() for f in p.glob("*.safetensors"))
    largest = 1024 * 384 * 4
    common = ["--rank", "8", "--backend", "torch", "--quiet", "--max-shard-size", "100MB"]
    rss_small = peak_rss(["compress", "--out", tmp_path / "s", *common, *member_args(small)])
    rss_big = peak_rss(["compress", "--out", tmp_path / "b", *common, *member_args(big_family)])
    assert family_bytes > 100 * largest
    # Eight times more layers, and the peak barely moves: tensors stream through one name at a time.
    assert rss_big - rss_small < 0.25 * family_bytes, (rss_small, rss_big, family_bytes)
