"""files.py: bounded reads, the one JSON reader, the one atomic write and the one write probe."""

import os

import pytest

import files


def test_read_json_names_the_file_for_every_way_it_can_fail(tmp_path):
    cases = {
        "missing.json": (None, "no such file or directory"),
        "bad.json": ("{not json", "not valid JSON"),
        "deep.json": ("[" * 100000, "JSON this reader refuses"),
        "latin1.json": (b'{"a": "\xe9"}', "not UTF-8 text"),
        "big.json": ("[" + "1," * 600 + "1]", "larger than"),
    }
    for name, (content, message) in cases.items():
        if isinstance(content, str):
            (tmp_path / name).write_text(content)
        elif content is not None:
            (tmp_path / name).write_bytes(content)
        with pytest.raises(files.FileProblem, match=message) as error:
            files.read_json(tmp_path / name, 1 << 20 if name != "big.json" else 1000)
        assert name in str(error.value) and error.value.missing == (content is None)
    with pytest.raises(files.FileProblem, match="/dev/zero is not a regular file"):
        files.read_json("/dev/zero", 1 << 20)
    (tmp_path / "bom.json").write_bytes(b'\xef\xbb\xbf{"a": 1}')
    assert files.read_json(tmp_path / "bom.json", 100) == {"a": 1}


def test_write_atomic_gives_a_whole_file_with_the_umask_mode(tmp_path):
    old = os.umask(0o027)
    try:
        files.write_atomic(tmp_path / "a.txt", "text")
        files.write_json(tmp_path / "b.json", {"é": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "b.json").read_text() == '{\n "é": 1\n}'
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640  # 0666 less the umask, not mkstemp's 0600
    with pytest.raises(TypeError):  # a failure half-way leaves the old file and no temporary file
        files.write_atomic(tmp_path / "a.txt", 42)
    assert (tmp_path / "a.txt").read_text() == "text" and sorted(os.listdir(tmp_path)) == ["a.txt", "b.json"]


@pytest.mark.parametrize(
    "path, message",
    [
        ("{tmp}/no/such/dir/x.png", "the directory {tmp}/no/such/dir does not exist"),
        ("{tmp}/file/x.png", "a part of the path is not a directory"),
        ("{tmp}", "it is a directory"),
        ("{tmp}/" + "a" * 300, "longer than the file system allows"),
        ("/proc/x.png", "cannot create a file in /proc"),
    ],
)
def test_check_can_write_says_why_a_path_cannot_be_written(tmp_path, path, message):
    (tmp_path / "file").write_text("")
    path, message = path.format(tmp=tmp_path), message.format(tmp=tmp_path)
    with pytest.raises(files.FileProblem, match="cannot write") as error:
        files.check_can_write(path)
    assert message in str(error.value)
    files.check_can_write(tmp_path / "new.png")  # fine, and leaves nothing behind
    assert sorted(os.listdir(tmp_path)) == ["file"]
