"""Pure protocol modules against the real nix as the oracle."""

from __future__ import annotations

import hashlib
import random
import subprocess
from pathlib import Path

import pytest

from nixboot_cache import nar, narinfo, nix32, signing
from tests.cache.cache_helpers import NixFixture


def test_nix32_vector() -> None:
    digest = hashlib.sha256(b"abc").digest()
    assert nix32.encode(digest) == "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5s"
    assert nix32.decode(nix32.encode(digest), 32) == digest


@pytest.mark.parametrize("n", [0, 1, 5, 20, 32, 64])
def test_nix32_roundtrip(n: int) -> None:
    data = bytes((i * 37 + 11) % 256 for i in range(n))
    text = nix32.encode(data)
    assert len(text) == (nix32.encoded_length(n) if n else 0)
    if n:
        assert nix32.decode(text, n) == data


@pytest.mark.parametrize(
    "bad", ["e" * 52, "0" * 51, "z" * 52, "1b8m03r63zqhnjf7l5wnldhh7c134ap5vpj0850ymkq1iyzicy5S"]
)
def test_nix32_rejects(bad: str) -> None:
    assert not nix32.is_sha256(bad)


def _decodes(text: str) -> bool:
    try:
        nix32.decode(text, 32)
    except nix32.InvalidNix32:
        return False
    return True


def test_is_sha256_agrees_with_decode() -> None:
    """The fast check (first character and alphabet) accepts exactly what decode accepts: every
    first character with random tails, random hashes, and near misses (a bad character at each
    position, one character short or long, a trailing newline)."""
    rnd = random.Random(52)
    alphabet = nix32.ALPHABET
    texts = [c + "".join(rnd.choices(alphabet, k=51)) for c in alphabet + "eA/.\n"]
    for _ in range(300):
        texts.append(nix32.encode(rnd.randbytes(32)))
    good = texts[-1]
    texts += [good[:i] + bad + good[i + 1 :] for i in range(52) for bad in "eouT"]
    texts += [good[:51], good + "0", good + "\n", "", good.upper()]
    accepted = 0
    for text in texts:
        assert nix32.is_sha256(text) == _decodes(text), text
        accepted += _decodes(text)
    assert 300 < accepted < len(texts)  # both answers were exercised


def test_nar_equals_nix_store_dump(nixfx: NixFixture) -> None:
    paths = sorted(set(nixfx.gen1.store_paths + nixfx.gen2.store_paths))
    assert len(paths) >= 8
    for path in paths:
        theirs = subprocess.run(
            ["nix-store", "--dump", path], check=True, capture_output=True
        ).stdout
        ours = b"".join(nar.dump(path))
        assert ours == theirs, path
        h = nixfx.run("nix-store", "-q", "--hash", path).stdout.strip()
        assert narinfo.sha256_to_nix32(h) == "sha256:" + nix32.encode(hashlib.sha256(ours).digest())


def test_nar_streams_in_bounded_chunks(nixfx: NixFixture) -> None:
    lib = next(p for p in nixfx.gen1.store_paths if p.endswith("-nb-lib"))
    chunks = list(nar.dump(lib))
    assert len(chunks) > 2
    assert max(len(c) for c in chunks) <= nar.CHUNK + 64 * 1024


def test_nar_rejects_special_files(tmp_path: Path) -> None:
    import os

    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(nar.UnsupportedFile):
        b"".join(nar.dump(tmp_path))


def test_narinfo_and_signature_equal_nix_copy(
    nixfx: NixFixture, nix_keys: tuple[str, str], tmp_path: Path
) -> None:
    """Render our narinfo from path info + our NAR; compare with `nix copy --to file://` field by
    field (URL/FileHash/FileSize aside: zstd output differs by compressor version/level)."""
    sk_text, pk_text = nix_keys
    sk_file = nixfx.work / "sk"
    dest = tmp_path / "bc"
    nixfx.run("nix", "copy", "--to", f"file://{dest}?compression=zstd&secret-key={sk_file}",
              nixfx.gen1.toplevel)  # fmt: skip
    key = signing.SecretKey.parse(sk_text)
    assert str(key) == sk_text
    assert str(key.public()) == pk_text
    for info in nixfx.gen1.paths:
        path = str(info["path"])
        theirs = narinfo.parse((dest / f"{narinfo.store_hash(path)}.narinfo").read_text())
        data = b"".join(nar.dump(path))
        refs = tuple(sorted(str(r).removeprefix("/nix/store/") for r in info["references"]))  # type: ignore[attr-defined]
        ours = key.sign_narinfo(
            narinfo.NarInfo(
                store_path=path,
                url=theirs.url,
                compression="zstd",
                file_hash=theirs.file_hash,
                file_size=theirs.file_size,
                nar_hash="sha256:" + nix32.encode(hashlib.sha256(data).digest()),
                nar_size=len(data),
                references=refs,
                deriver=str(info["deriver"]).removeprefix("/nix/store/")
                if "deriver" in info
                else None,
                ca=str(info["ca"]) if "ca" in info else None,
            )
        )
        assert ours == theirs, path
        assert ours.sigs == theirs.sigs  # deterministic ed25519: byte-equal signatures
        assert ours.render() == (dest / f"{narinfo.store_hash(path)}.narinfo").read_text()
        assert narinfo.parse(ours.render()) == ours
        assert key.public().verify(signing.narinfo_fingerprint(ours), ours.sigs[0])
        assert not key.public().verify(signing.narinfo_fingerprint(ours) + "x", ours.sigs[0])


def test_our_signatures_pass_nix_store_verify(nixfx: NixFixture, tmp_path: Path) -> None:
    """Sign with a key we generated; the real `nix store verify` accepts it (and rejects a store
    signed by a key it does not trust)."""
    key = signing.load_or_create(tmp_path / "k.sec", tmp_path / "k.pub", "ours-1")
    assert signing.load_or_create(tmp_path / "k.sec", tmp_path / "k.pub", "x") == key
    dest = tmp_path / "bc"
    nixfx.run("nix", "copy", "--to", f"file://{dest}?compression=zstd", nixfx.gen1.toplevel)
    for f in dest.glob("*.narinfo"):
        f.write_text(key.sign_narinfo(narinfo.parse(f.read_text())).render())
    ok = nixfx.run("nix", "store", "verify", "--store", f"file://{dest}", "--trusted-public-keys",
                   str(key.public()), "-r", nixfx.gen1.toplevel, check=False)  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    other = signing.SecretKey.generate("ours-1").public()
    bad = nixfx.run("nix", "store", "verify", "--store", f"file://{dest}", "--trusted-public-keys",
                    str(other), "-r", nixfx.gen1.toplevel, check=False)  # fmt: skip
    assert bad.returncode != 0


@pytest.mark.parametrize(
    "text",
    [
        "StorePath: /nix/store/x\n",
        "URL: nar/a.nar\nNarHash: sha256:00\nNarSize: 1\n",
        "StorePath: /nix/store/" + "a" * 32 + "-x\nURL: u\nNarHash: sha256:zz\nNarSize: 3\n",
        "no newline",
        "garbage line\n",
    ],
)
def test_narinfo_parse_rejects(text: str) -> None:
    with pytest.raises(narinfo.InvalidNarInfo):
        narinfo.parse(text)


@pytest.mark.parametrize("bad", ["nokey", "n:!!!", "n:" + "QUJD", ":" + "A" * 88])
def test_bad_keys_rejected(bad: str) -> None:
    with pytest.raises(signing.InvalidKey):
        signing.SecretKey.parse(bad)
