"""Nothing lost, nothing crashes: the converter never deletes what it did not create, and
damaged or hostile inputs give one-line errors instead of garbage or tracebacks.

Every data-loss case hashes every file around the output before and after.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import mlx_diffgemma.convert.write as conv
from mlx_diffgemma.convert.commands import ConversionInterrupted, convert
from mlx_diffgemma.convert.quantize import quantize
from mlx_diffgemma.convert.verify import VerifyError, verify
from mlx_diffgemma.models.checkpoint import INDEX_FILE, ConversionError, WeightsError, read_header
from mlx_diffgemma.models.loader import load

REPO = Path(__file__).resolve().parents[1]
QUIET = dict(progress=False, verbose=False)


@pytest.fixture(scope="module")
def hf(ckpt_factory):
    return ckpt_factory("q64")


@pytest.fixture(scope="module")
def q4(hf, tmp_path_factory):
    """A quantized MLX directory (mixed-4), converted once."""
    out = tmp_path_factory.mktemp("q4") / "q4"
    convert(hf, out, quantize=True, **QUIET)
    return out


def _hashes(root: Path) -> dict:
    """relative path -> sha256 of every file under `root` (symlinks as their target text)."""
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p.relative_to(root))] = "link:" + os.readlink(p)
        elif p.is_file():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leftovers(parent: Path, name: str):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(name + "."))


# -- the output never swallows the input ---------------------------------------------------


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("where", ["same", "inside", "parent", "link-to-source"])
def test_output_overlapping_the_source_is_refused(hf, tmp_path, where, force):
    root = tmp_path / "root"
    src = root / "src"
    shutil.copytree(hf, src)
    (root / "unrelated.txt").write_text("someone else's file")
    out = {
        "same": src,
        "inside": src / "mlx",
        "parent": root,
        "link-to-source": tmp_path / "link",
    }[where]
    if where == "link-to-source":
        out.symlink_to(src, target_is_directory=True)
    before = _hashes(tmp_path)
    with pytest.raises(ConversionError, match=r"refusing to write .*the source .* would be deleted"):
        convert(src, out, force=force, **QUIET)
    assert _hashes(tmp_path) == before


def test_quantize_onto_its_own_input_is_refused(q4, tmp_path, capsys):
    src = tmp_path / "m"
    shutil.copytree(q4, src)
    before = _hashes(tmp_path)
    for out in (src, tmp_path):
        with pytest.raises(ConversionError, match=r"refusing to write .*(is|contains) the source"):
            quantize(src, out, recipe="8bit", force=True, **QUIET)
    assert _hashes(tmp_path) == before
    # Each command names its own output flag in the fix.
    from mlx_diffgemma.cli import main

    assert main(["quantize", "--mlx-path", str(src), "-o", str(src / "q"), "--no-progress"]) == 1
    err = " ".join(capsys.readouterr().err.split())
    assert "choose an output (-o/--out) outside the source directory" in err and "--mlx-path outside" not in err
    assert main(["convert", "--hf-path", str(src), "--mlx-path", str(src / "q"), "--no-progress"]) == 1
    assert "choose an output (--mlx-path) outside the source directory" in " ".join(capsys.readouterr().err.split())
    assert _hashes(tmp_path) == before


@pytest.mark.parametrize("force", [False, True])
def test_source_file_symlinked_inside_the_output_is_refused(hf, tmp_path, force):
    """The hub cache's layout: the snapshot's files are links into a blobs folder."""
    blobs = tmp_path / "blobs"
    shutil.copytree(hf, blobs)
    snap = tmp_path / "snapshot"
    snap.mkdir()
    for f in blobs.iterdir():
        (snap / f.name).symlink_to(f)
    before = _hashes(tmp_path)
    with pytest.raises(ConversionError, match=r"refusing to write .*contains the source"):
        convert(snap, blobs, force=force, **QUIET)
    assert _hashes(tmp_path) == before


# -- publishing replaces only what was checked ---------------------------------------------


def _appear_before_publish(monkeypatch, action):
    real = conv.copy_sidecars

    def copy_then_act(src, dst):
        copied = real(src, dst)
        action()
        return copied

    monkeypatch.setattr(conv, "copy_sidecars", copy_then_act)


@pytest.mark.parametrize("content", ["files", "empty"])
def test_directory_appearing_during_conversion_is_not_deleted(hf, tmp_path, monkeypatch, content):
    out = tmp_path / "out"

    def appear():
        out.mkdir()
        if content == "files":
            (out / "user.txt").write_text("mine")

    _appear_before_publish(monkeypatch, appear)
    with pytest.raises(ConversionError, match=r"appeared during the conversion; left it untouched and "
                       r"kept the new output at (\S+)") as e:
        convert(hf, out, **QUIET)
    assert _hashes(out) == ({"user.txt": hashlib.sha256(b"mine").hexdigest()} if content == "files" else {})
    kept = Path(str(e.value).rsplit(" at ", 1)[1])
    assert kept.parent == tmp_path and kept.name.startswith("out.converted-")
    verify(kept)
    assert _leftovers(tmp_path, "out") == [kept.name]


def test_force_replaces_only_the_directory_found_at_the_start(hf, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("checked, may go")

    def swap():
        out.rename(tmp_path / "moved")
        out.mkdir()
        (out / "user.txt").write_text("arrived later, must stay")

    _appear_before_publish(monkeypatch, swap)
    with pytest.raises(ConversionError, match=r"was replaced by another directory during the conversion"):
        convert(hf, out, force=True, **QUIET)
    assert (out / "user.txt").read_text() == "arrived later, must stay"
    assert (tmp_path / "moved" / "old.txt").read_text() == "checked, may go"
    assert not list(tmp_path.glob("out.tmp-*")) and not list(tmp_path.glob("out.old-*"))


def test_force_replaces_the_checked_directory(hf, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("x")
    convert(hf, out, force=True, **QUIET)
    assert not (out / "old.txt").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path, "out") == []


def test_symlinked_output_is_written_at_the_target(hf, tmp_path):
    target = tmp_path / "external-drive" / "model"
    target.mkdir(parents=True)
    (target / "old.txt").write_text("previous conversion")
    lms = tmp_path / "lmstudio" / "publisher"
    lms.mkdir(parents=True)
    link = lms / "model"
    link.symlink_to(target, target_is_directory=True)
    with pytest.raises(ConversionError, match="already exists"):
        convert(hf, link, **QUIET)
    summary = convert(hf, link, force=True, **QUIET)
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert (target / "config.json").is_file() and not (target / "old.txt").exists()
    assert sorted(p.name for p in lms.iterdir()) == ["model"]
    assert _leftovers(target.parent, "model") == []
    assert summary["path"] == str(link)
    verify(link)


def test_dangling_symlinked_output_is_created_at_the_target(hf, tmp_path):
    target = tmp_path / "drive" / "model"
    target.parent.mkdir()
    link = tmp_path / "model"
    link.symlink_to(target, target_is_directory=True)
    convert(hf, link, **QUIET)
    assert link.is_symlink() and (target / "config.json").is_file()


# -- signals and killed runs ---------------------------------------------------------------


def _kill_self_on_write(monkeypatch, signum, at=3):
    real = conv._pwrite_all
    calls = {"n": 0}

    def write(fd, data, offset):
        calls["n"] += 1
        if calls["n"] == at:
            os.kill(os.getpid(), signum)
        return real(fd, data, offset)

    monkeypatch.setattr(conv, "_pwrite_all", write)
    return calls


@pytest.mark.parametrize("name", ["SIGTERM", "SIGHUP"])
def test_sigterm_and_sighup_remove_the_partial_output(hf, tmp_path, monkeypatch, name):
    signum = getattr(signal, name)
    before = signal.getsignal(signum)
    calls = _kill_self_on_write(monkeypatch, signum)
    out = tmp_path / "out"
    with pytest.raises(ConversionInterrupted, match=f"terminated by {name}; removed the partial output") as e:
        convert(hf, out, **QUIET)
    assert calls["n"] == 3, "the signal interrupted the write it arrived in"
    assert e.value.exit_code == 128 + signum
    assert _leftovers(tmp_path, "out") == [] and not out.exists()
    assert signal.getsignal(signum) is before


def test_sigterm_to_the_command_line(hf, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent(
        f"""
        import os, signal, sys
        import mlx_diffgemma.convert.write as conv
        real, n = conv._pwrite_all, [0]
        def write(fd, data, offset):
            n[0] += 1
            if n[0] == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return real(fd, data, offset)
        conv._pwrite_all = write
        from mlx_diffgemma.cli import main
        sys.exit(main(["convert", "--hf-path", {str(hf)!r}, "--mlx-path", {str(out)!r},
                       "-q", "--no-progress"]))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 128 + signal.SIGTERM, res.stderr
    assert "terminated by SIGTERM" in res.stderr
    assert _leftovers(tmp_path, "out") == [] and not out.exists()


# A conversion run as the command, with the final swap slowed at one point (`pause`:
# "aside", right after the previous output moved to OUT.old-PID; "published", right after
# the new output took its name), so that a signal can be sent exactly there.
SLOW_SWAP = """
import sys, time
import mlx_diffgemma.convert.publish as pub
pause, rename, rmtree = sys.argv[1], pub.rename_noreplace, pub.shutil.rmtree
def slow_rename(src, dst):
    rename(src, dst)
    if pause == "aside" and ".old-" in str(dst):
        print("SWAP", flush=True); time.sleep(3)
def slow_rmtree(path, *a, **k):
    if pause == "published" and ".old-" in str(path):
        print("SWAP", flush=True); time.sleep(3)
    return rmtree(path, *a, **k)
pub.rename_noreplace, pub.shutil.rmtree = slow_rename, slow_rmtree
from mlx_diffgemma.cli import main
sys.exit(main(["convert", "--hf-path", sys.argv[2], "--mlx-path", sys.argv[3], "-q", "--force",
               "--no-progress"]))
"""


def _stop_at_the_swap(hf, out: Path, pause: str, signum: int):
    """Runs `convert --force` onto `out` and sends it `signum` at the swap point."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SWAP, pause, str(hf), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert "SWAP" in proc.stdout.readline()
    assert list(out.parent.glob("out.old-*")), "the previous output is aside"
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, " ".join(err.split())


def _previous_output(hf, out: Path) -> dict:
    convert(hf, out, **QUIET)  # unquantized: tells itself apart from the -q output
    (out / "note.txt").write_text("the previous output")
    return _hashes(out)


def test_sigterm_at_the_swap_waits_for_it_and_says_where_things_are(hf, tmp_path):
    """SIGTERM the moment the previous output moved to OUT.old-PID: the swap finishes (a
    half-done swap would leave no OUT), the message says OUT holds the new output, and
    nothing is left beside it."""
    out = tmp_path / "out"
    before = _previous_output(hf, out)
    code, err = _stop_at_the_swap(hf, out, "aside", signal.SIGTERM)
    assert code == 128 + signal.SIGTERM, err
    assert f"conversion terminated by SIGTERM as it finished: {out} holds the new output; the previous " \
           "output was removed" in err
    assert "untouched" not in err
    assert _leftovers(tmp_path, "out") == []
    assert _hashes(out) != before and not (out / "note.txt").exists()
    assert json.loads((out / "config.json").read_text())["quantization"]
    verify(out)


@pytest.mark.parametrize("pause", ["aside", "published"])
def test_a_swap_cut_by_sigkill_is_undone_or_finished_by_the_next_run(hf, tmp_path, pause, capsys):
    """SIGKILL cannot wait for the swap. Cut with the previous output aside and the new
    one not in place, the next run moves the previous one back (and, without --force,
    refuses to overwrite it); cut after the new output took its name, it removes the
    previous one. Either way it says what it did, and nothing is left over."""
    from mlx_diffgemma.cli import main

    out = tmp_path / "out"
    before = _previous_output(hf, out)
    code, _ = _stop_at_the_swap(hf, out, pause, signal.SIGKILL)
    assert code == -signal.SIGKILL
    old = [p.name for p in tmp_path.glob("out.old-*")]
    assert len(old) == 1
    assert out.exists() == (pause == "published")
    if pause == "aside":
        assert main(["convert", "--hf-path", str(hf), "--mlx-path", str(out), "--no-progress"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"moved {old[0]} back to out: a conversion replacing it was killed in the middle of its " \
               "final swap, so the previous output is restored" in err
        assert "already exists; pass --force" in err
        assert _hashes(out) == before
    else:
        published = _hashes(out)
        assert main(["verify", str(out)]) == 0
        summary = convert(hf, tmp_path / "other", **QUIET)  # another output: out is not touched
        assert summary["warnings"] == []
        assert main(["convert", "--hf-path", str(hf), "--mlx-path", str(out), "--no-progress"]) == 1
        err = " ".join(capsys.readouterr().err.split())
        assert f"removed {old[0]}, the previous output of out, left by a conversion killed after " \
               "publishing its new output" in err
        assert _hashes(out) == published
    assert _leftovers(tmp_path, "out") == []


def test_a_swap_cut_before_another_output_appeared_leaves_both(hf, tmp_path):
    """Cut with the previous output aside, then someone made OUT: neither is removed."""
    from mlx_diffgemma.convert.publish import recover_swaps

    out = tmp_path / "out"
    _previous_output(hf, out)
    _stop_at_the_swap(hf, out, "aside", signal.SIGKILL)
    out.mkdir()
    (out / "mine.txt").write_text("made since")
    old = next(tmp_path.glob("out.old-*"))
    held = _hashes(old)
    (message,) = recover_swaps(out)
    assert "was made since: both left as they are" in message
    assert (out / "mine.txt").read_text() == "made since" and _hashes(old) == held


def test_stale_tmp_of_a_killed_run_is_removed(hf, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f"out.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model-00001-of-00001.safetensors").write_bytes(b"\0" * 1000)
    alive = tmp_path / f"out.tmp-{os.getppid()}"  # a conversion still running
    alive.mkdir()
    (alive / "x").write_text("busy")
    other = tmp_path / "other.tmp-12"
    other.mkdir()
    summary = convert(hf, tmp_path / "out", **QUIET)
    assert not stale.exists()
    assert any(f"removed {stale.name}, left by a conversion that was killed" in w for w in summary["warnings"])
    assert (alive / "x").read_text() == "busy" and other.is_dir()


# -- damaged safetensors headers -------------------------------------------------------------


def _write_st(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def _f32(n, begin):
    return {"dtype": "F32", "shape": [n], "data_offsets": [begin, begin + 4 * n]}


HEADERS = {
    "identical ranges": ({"a": _f32(2, 0), "b": _f32(2, 0)}, 8, "overlaps the previous tensor"),
    "overlap": ({"a": _f32(2, 0), "b": _f32(2, 4)}, 12, "overlaps the previous tensor"),
    "gap": ({"a": _f32(1, 4)}, 8, "leaves a gap of 4 bytes"),
    "trailing bytes": ({"a": _f32(1, 0)}, 8, "4 bytes after the last tensor are not described"),
    "truncated": ({"a": _f32(4, 0)}, 8, "corrupt or truncated"),
    "bad shape": ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, "malformed shape"),
    "bad offsets": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, 8, "malformed data_offsets"),
    "bad dtype": ({"a": {"dtype": "F99", "shape": [2], "data_offsets": [0, 8]}}, 8, "unsupported dtype"),
    "entry not an object": ({"a": [1, 2]}, 0, "malformed header entry"),
}


@pytest.mark.parametrize("case", sorted(HEADERS))
def test_read_header_rejects_what_safetensors_rejects(tmp_path, case):
    header, nbytes, message = HEADERS[case]
    f = _write_st(tmp_path / "x.safetensors", header, b"\0" * nbytes)
    with pytest.raises(ConversionError, match=f"{f}.*{message}"):
        read_header(f)
    from safetensors import SafetensorError, safe_open

    with pytest.raises(SafetensorError):  # the reference library agrees
        with safe_open(str(f), "np"):
            pass


def test_read_header_accepts_zero_size_tensors_at_one_offset(tmp_path):
    empty = {"dtype": "F32", "shape": [0], "data_offsets": [4, 4]}
    f = _write_st(tmp_path / "x.safetensors", {"a": _f32(1, 0), "b": empty, "c": empty}, b"\0" * 4)
    assert sorted(read_header(f)[0]) == ["a", "b", "c"]


@pytest.mark.parametrize("raw", [b"[" * 100_000, b'{"a":' * 100_000, b'{"a": 1, "a": 2}'])
def test_hostile_header_json_is_one_line(tmp_path, raw):
    f = tmp_path / "x.safetensors"
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(ConversionError, match=rf"{f} is not a valid safetensors file \((its header nests "
                       r"too deeply|unreadable header: key 'a' appears twice)"):
        read_header(f)


def _rewrite_header(path: Path, edit) -> None:
    """Applies `edit(header dict)` to a safetensors file's header, data untouched."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    edit(header)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + blob[8 + n :])


def _damaged_copy(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    _rewrite_header(next(dst.glob("*.safetensors")), edit)
    return dst


NORM = "model.decoder.norm.weight"


def _alias(header):
    """Points the final norm at the bytes of another tensor of the same size."""
    n = header[NORM]
    twin = next(k for k, v in header.items() if k != NORM and k != "__metadata__"
                and v["dtype"] == n["dtype"] and v["shape"] == n["shape"])
    n["data_offsets"] = list(header[twin]["data_offsets"])


def _relabel(header):
    header[NORM]["dtype"] = "I32"


@pytest.mark.parametrize("edit, message", [
    (_alias, "overlaps the previous tensor|leaves a gap"),
    (_relabel, f"tensor {NORM} is labelled I32 but the model expects a float"),
])
def test_damaged_weights_are_refused_everywhere(hf, q4, tmp_path, monkeypatch, edit, message):
    for name, src in (("hf", hf), ("q4", q4)):
        bad = _damaged_copy(src, tmp_path / name, edit)
        with pytest.raises(ConversionError, match=message):
            convert(bad, tmp_path / f"{name}-out", **QUIET)
        assert _leftovers(tmp_path, f"{name}-out") == []
        with pytest.raises(WeightsError, match=message.replace("I32", "int32")):
            load(bad)
    with pytest.raises(VerifyError, match="overlaps|gap" if edit is _alias else f"{NORM} is I32, expected a float"):
        verify(tmp_path / "q4")


def test_loader_checks_the_header_before_mx_load(ckpt_tiny, tmp_path, monkeypatch):
    import mlx.core as mx

    bad = tmp_path / "m"
    shutil.copytree(ckpt_tiny, bad)
    f = bad / "model.safetensors"
    raw = b"[" * 200_000
    f.write_bytes(struct.pack("<Q", len(raw)) + raw)

    def never(*a, **k):
        raise AssertionError("mx.load reached")

    monkeypatch.setattr(mx, "load", never)
    with pytest.raises(WeightsError, match="nests too deeply"):
        load(bad)


# -- verify checks what chat needs -------------------------------------------------------------


def _break_tokenizer(d):
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "nonsense"')


def _drop_tokenizer(d):
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (d / f).unlink()


def _break_template(d):
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}")


def _break_generation_json(d):
    (d / "generation_config.json").write_text('{"t_min": 0.4,')


def _bad_generation_value(d):
    (d / "generation_config.json").write_text(json.dumps({"t_min": 0.9, "t_max": 0.5}))


def _generation_not_an_object(d):
    (d / "generation_config.json").write_text("[1, 2]")


SIDECARS = [
    (_break_tokenizer, "the tokenizer in .* cannot be loaded"),
    (_drop_tokenizer, "no tokenizer in"),
    (_break_template, r"chat_template.jinja is not a valid Jinja template"),
    (_break_generation_json, "generation_config.json is not valid JSON"),
    (_bad_generation_value, "t_min must not exceed t_max"),
    (_generation_not_an_object, r"generation_config.json holds a JSON \w+, not a generation config"),
]


@pytest.mark.parametrize("damage, message", SIDECARS, ids=[d.__name__ for d, _ in SIDECARS])
def test_verify_and_convert_report_what_chat_cannot_use(q4, tmp_path, damage, message):
    d = tmp_path / "m"
    shutil.copytree(q4, d)
    damage(d)
    with pytest.raises(VerifyError, match=message):
        verify(d)
    summary = quantize(d, tmp_path / "out", recipe="8bit", **QUIET)  # converts, with a warning
    assert any(__import__("re").search(message, w) for w in summary["warnings"]), summary["warnings"]
    with pytest.raises(VerifyError, match=message):
        verify(tmp_path / "out")


def test_verify_ok_on_a_good_directory(q4):
    assert verify(q4)["quantized_modules"] > 0


# -- numbers on the command line ----------------------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["convert", "--max-shard-size-gb", "0"], "--max-shard-size-gb: must be a finite number > 0"),
    (["convert", "--max-shard-size-gb", "-1"], "--max-shard-size-gb: must be a finite number > 0"),
    (["convert", "--max-shard-size-gb", "nan"], "--max-shard-size-gb: must be a finite number > 0"),
    (["convert", "--max-shard-size-gb", "inf"], "--max-shard-size-gb: must be a finite number > 0"),
    (["quantize", "--max-shard-size-gb", "big"], "--max-shard-size-gb: 'big' is not a number"),
    (["verify", "m", "--canvases", "0"], "--canvases: must be an integer >= 1"),
    (["verify", "m", "--canvases", "1.5"], "--canvases: '1.5' is not an integer"),
    (["verify", "m", "--min-agreement", "1.5"], "--min-agreement: must be a fraction between 0 and 1"),
    (["verify", "m", "--min-agreement", "nan"], "--min-agreement: must be a fraction between 0 and 1"),
])
def test_numeric_options_out_of_range(argv, message, capsys):
    from mlx_diffgemma.cli import main as cli

    paths = {"convert": ["--hf-path", "a", "--mlx-path", "b"], "quantize": ["--mlx-path", "a", "--out", "b"]}
    with pytest.raises(SystemExit) as e:
        cli(argv[:1] + paths.get(argv[0], []) + argv[1:])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1], err


def test_huge_shard_size_does_not_overflow(hf, tmp_path):
    from mlx_diffgemma.cli import main as cli

    out = tmp_path / "out"
    assert cli(["convert", "--hf-path", str(hf), "--mlx-path", str(out), "--no-progress",
                "--max-shard-size-gb", "1e308"]) == 0
    assert len(list(out.glob("*.safetensors"))) == 1


# -- hostile JSON in config.json, the index, the quantization record -----------------------


def _set(path, *keys_and_value):
    def edit(d):
        data = json.loads((d / path).read_text())
        *keys, last, value = keys_and_value
        node = data
        for k in keys:
            node = node[k]
        node[last] = value
        (d / path).write_text(json.dumps(data))
    return edit


def _replace(path, text):
    def edit(d):
        (d / path).write_text(text)
    return edit


HOSTILE = {
    "config is a list": (_replace("config.json", "[]"), r"config.json holds a JSON list, not a model config"),
    "config nests deeply": (_replace("config.json", "[" * 100_000),
                            r"config.json (nests too deeply|is not valid JSON)"),
    "text_config is a list": (_set("config.json", "text_config", []),
                              r"config.json: text_config is missing or not an object"),
    "hidden_size is text": (_set("config.json", "text_config", "hidden_size", "big"),
                            r"config.json: text_config.hidden_size must be a positive integer \(got 'big'\)"),
    "weight_map is a list": (_set(INDEX_FILE, "weight_map", []), r"field weight_map must map tensor names"),
    "weight_map value a number": (_set(INDEX_FILE, "weight_map", "model.decoder.norm.weight", 3),
                                  r"field weight_map\['model.decoder.norm.weight'\] must be a shard file name"),
    "weight_map escapes": (_set(INDEX_FILE, "weight_map", "model.decoder.norm.weight", "../x.safetensors"),
                           r"must be a shard file name in the same directory"),
    "index is a string": (_replace(INDEX_FILE, '"x"'), r"holds a JSON str, not a safetensors index"),
    "bits is text": (_set("config.json", "quantization", "bits", "four"), r"quantization.bits is 'four'"),
    "group size 0": (_set("config.json", "quantization", "group_size", 0), r"quantization.group_size is 0"),
    "record is a list": (_set("config.json", "quantization", [4]), r"quantization must be an object"),
    "module bits fractional": (_set("config.json", "quantization", "model.decoder.embed_tokens", {"bits": 4.5}),
                               r"quantization\['model.decoder.embed_tokens'\].bits is 4.5"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_json_gives_one_line_naming_the_file(q4, tmp_path, case):
    edit, message = HOSTILE[case]
    d = tmp_path / "m"
    shutil.copytree(q4, d)
    edit(d)
    with pytest.raises(ConversionError, match=message) as e:
        quantize(d, tmp_path / "out", recipe="8bit", **QUIET)
    assert "\n" not in str(e.value) and str(d) in str(e.value)
    with pytest.raises(VerifyError, match=message):
        verify(d)
    assert _leftovers(tmp_path, "out") == []
