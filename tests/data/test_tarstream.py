import gzip
import io
import tarfile

import pytest
import webdataset as wds
from webdataset.tariterators import tar_file_expander

from genflow.data.tarstream import TarFormatError, tar_members

MEMBERS = [
    ("000001.ppm", b"P6\n2 1\n255\n" + bytes(range(6))),
    ("000001.attrs.npy", b"\x93NUMPY" + bytes(50)),
    ("empty.txt", b""),
    ("exactly-one-block.bin", bytes(range(256)) * 2),
    ("d" * 90 + "/" + "n" * 60 + ".ppm", b"a path over 100 characters that ustar splits into a prefix"),
    ("x" * 180 + ".jpg", b"a name over 100 characters in one piece: pax or GNU long name"),
    ("gesicht-\u00fc\u00f1\u00ee.ppm", b"non-ASCII: a pax path record"),
]


def write_tar(path, tar_format, members=MEMBERS, with_directory=True):
    with tarfile.open(path, "w", format=tar_format) as tar:
        if with_directory:
            directory = tarfile.TarInfo("a-directory")
            directory.type = tarfile.DIRTYPE
            tar.addfile(directory)
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1_700_000_000.5  # a float mtime: pax records it
            tar.addfile(info, io.BytesIO(data))


def webdataset_reads(path):
    with open(path, "rb") as stream:
        # Less the empty end-of-shard marker webdataset adds.
        return [(m["fname"], m["data"]) for m in tar_file_expander([{"url": str(path), "stream": stream}]) if m]


@pytest.mark.parametrize("tar_format", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT])
def test_reads_what_tarfile_and_webdataset_read(tmp_path, tar_format):
    path = tmp_path / "shard.tar"
    write_tar(path, tar_format)
    ours = [(m["fname"], m["data"]) for m in tar_members(str(path))]
    assert ours == MEMBERS
    assert ours == webdataset_reads(path)
    assert all(m["__url__"] == str(path) for m in tar_members(str(path)))


def test_reads_what_webdatasets_writer_writes(tmp_path):
    path = tmp_path / "shard.tar"
    samples = [{"__key__": f"{i:06d}", "ppm": bytes([i]) * (i * 37), "attrs.npy": bytes([i]) * 40} for i in range(30)]
    with wds.TarWriter(str(path), encoder=False, mtime=0) as writer:
        for sample in samples:
            writer.write(sample)
    ours = [(m["fname"], m["data"]) for m in tar_members(str(path))]
    assert ours == webdataset_reads(path)
    assert len(ours) == 60 and ours[1] == ("000000.ppm", b"")


def test_a_corrupt_header_is_refused_with_where(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tarfile.USTAR_FORMAT, MEMBERS[:3], with_directory=False)
    data = bytearray(path.read_bytes())
    second_header = 512 + 512  # the first member's header, then its 17 bytes of data padded to 512
    data[second_header + 10] ^= 0x01  # one bit of the second member's name
    path.write_bytes(bytes(data))
    with pytest.raises(TarFormatError, match=rf"{path}: bad tar header checksum at byte {second_header}"):
        list(tar_members(str(path)))


def test_a_truncated_shard_is_refused(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tarfile.USTAR_FORMAT, MEMBERS[:4], with_directory=False)
    whole = path.read_bytes()
    end_of_members = -(-len(whole.rstrip(b"\0")) // 512) * 512  # the last member ends in 0xff
    assert list(tar_members(str(path)))[-1]["fname"] == "exactly-one-block.bin"
    for cut in (512 * 3 + 100, 512 * 4 + 10, end_of_members):  # in padding, in a header, before the end blocks
        path.write_bytes(whole[:cut])
        with pytest.raises(TarFormatError, match=f"{path}: .*(ends|truncated)"):
            list(tar_members(str(path)))


def test_a_compressed_or_foreign_file_is_refused(tmp_path):
    plain = tmp_path / "shard.tar"
    write_tar(plain, tarfile.USTAR_FORMAT, MEMBERS[:2])
    compressed = tmp_path / "shard.tar.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))
    with pytest.raises(TarFormatError, match="shard.tar.gz: a compressed file"):
        list(tar_members(str(compressed)))
    text = tmp_path / "notes.tar"
    text.write_text("not a tar file\n" * 100)
    with pytest.raises(TarFormatError, match="notes.tar"):
        list(tar_members(str(text)))


def test_a_long_named_directory_keeps_its_name_to_itself(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        directory = tarfile.TarInfo("d" * 150)  # GNU writes an 'L' long-name member before it
        directory.type = tarfile.DIRTYPE
        tar.addfile(directory)
        info = tarfile.TarInfo("short.ppm")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    assert [(m["fname"], m["data"]) for m in tar_members(str(path))] == [("short.ppm", b"abc")] == webdataset_reads(path)


def test_an_unsupported_member_is_named_at_its_own_offset(tmp_path):
    path = tmp_path / "shard.tar"
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        info = tarfile.TarInfo("first.ppm")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
        sparse = tarfile.TarInfo("sparse")
        sparse.type = b"S"
        tar.addfile(sparse)
    with pytest.raises(TarFormatError, match=r"unsupported tar member type b'S' at byte 1024$"):
        list(tar_members(str(path)))


def test_a_byte_range_reads_the_members_in_it_and_names_a_cut_member(tmp_path):
    path = tmp_path / "shard.tar"
    write_tar(path, tarfile.USTAR_FORMAT, MEMBERS[:4], with_directory=False)
    with tarfile.open(path) as tar:
        offsets = [member.offset for member in tar] + [None]
    whole = [(m["fname"], m["data"]) for m in tar_members(str(path))]
    # Members 1 and 2: from the header of the second to the end of the third (the header of the fourth).
    ranged = [(m["fname"], m["data"]) for m in tar_members(str(path), offsets[1], offsets[3])]
    assert ranged == whole[1:3]
    with pytest.raises(TarFormatError, match=rf"member at byte {offsets[1]} runs past the end of the range, byte 1600"):
        list(tar_members(str(path), offsets[1], 1600))  # inside member 1's padding
    with pytest.raises(TarFormatError, match=rf"member at byte {offsets[3]} ends early"):
        list(tar_members(str(path), offsets[3], offsets[3] + 600))  # inside member 3's data
    with pytest.raises(ValueError, match="needs the byte where the range stops"):
        list(tar_members(str(path), offsets[1]))
