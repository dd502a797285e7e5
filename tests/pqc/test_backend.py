"""Backend selection, the liboqs probe, and the liboqs glue (against a stand-in `oqs`)."""

from __future__ import annotations

import ctypes.util
import gc
import importlib.metadata
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import pqc
import pqc.backend as backend
from pqc import PqcError, get_kem, get_mldsa
from tests.support.pqc_vectors import mlkem_vectors

FAKE_OQS_DIR = Path(__file__).parent / "fake_oqs"
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def fresh_probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Isolate the probe from this machine: no loader-cache hit, no library dirs."""
    backend.probe_liboqs.cache_clear()
    monkeypatch.delenv("OQS_INSTALL_PATH", raising=False)
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: None)
    monkeypatch.setattr(backend, "_library_dirs", lambda: [])
    monkeypatch.setattr(backend, "_oqs_module", None)
    saved = sys.modules.pop("oqs", None)
    yield
    sys.modules.pop("oqs", None)
    if saved is not None:
        sys.modules["oqs"] = saved
    backend.probe_liboqs.cache_clear()


def _fake_install(root: Path, libdir: str = "lib") -> Path:
    """A fake liboqs install prefix with a (non-loadable) shared library file."""
    (root / libdir).mkdir(parents=True)
    (root / libdir / "liboqs.so").write_bytes(b"not really ELF")
    return root


@pytest.fixture
def fake_liboqs(fresh_probe: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """liboqs "installed" under a prefix only the directory scan finds, plus the
    stand-in `oqs` package on sys.path."""
    prefix = _fake_install(tmp_path / "usr-local")
    monkeypatch.setattr(backend, "_library_dirs", lambda: [prefix / "lib"])
    monkeypatch.syspath_prepend(str(FAKE_OQS_DIR))
    return prefix


# Run in a clean interpreter: import pqc, probe, use `auto`, and record whether `oqs` was
# imported *before* anything asks for liboqs explicitly. The answer goes to a file, not
# stdout: the real liboqs-python prints to stdout when imported (version warnings), and
# where liboqs is installed the explicit request below does import it.
_NEVER_IMPORT_CODE = """
import json, sys, pqc
pqc.available_backends(); pqc.liboqs_available()
k = pqc.get_kem('ML-KEM-768', 'auto'); dk = k.generate()
ct, ss = k.encapsulate(dk.encapsulation_key); assert dk.decapsulate(ct) == ss
pqc.get_mldsa('ML-DSA-65', 'auto')
after_auto = 'oqs' in sys.modules
try:
    pqc.get_kem(backend='liboqs')
except pqc.PqcError:
    pass
result = {'after_auto': after_auto, 'backend': k.backend,
          'after_explicit': 'oqs' in sys.modules}
open(sys.argv[1], 'w').write(json.dumps(result))
"""


def _never_import(tmp_path: Path, env: dict[str, str] | None = None
                  ) -> tuple[dict[str, object], str]:
    out_file = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-c", _NEVER_IMPORT_CODE, str(out_file)],
                          capture_output=True, text=True, check=True, cwd=PROJECT_ROOT,
                          timeout=60, env=env)
    return json.loads(out_file.read_text()), proc.stdout


def test_import_and_auto_never_import_oqs(tmp_path: Path) -> None:
    # This machine as it is (with or without liboqs and liboqs-python).
    result, _ = _never_import(tmp_path)
    assert result["after_auto"] is False and result["backend"] == "openssl"


def test_auto_never_imports_a_noisy_installed_oqs(tmp_path: Path) -> None:
    # A machine where liboqs is "installed" (a prefix with liboqs.so) and `oqs` prints to
    # stdout on import, as the real module does. The control: the explicit liboqs request
    # does import it, and its print lands on stdout, so the check would see an import.
    prefix = _fake_install(tmp_path / "prefix")
    noisy = tmp_path / "noisy" / "oqs"
    noisy.mkdir(parents=True)
    fake = (FAKE_OQS_DIR / "oqs" / "__init__.py").read_text()
    future = "from __future__ import annotations\n"
    assert future in fake
    (noisy / "__init__.py").write_text(fake.replace(
        future, future + 'print("liboqs-python faulty: liboqs version mismatch")\n', 1))
    env = dict(os.environ, OQS_INSTALL_PATH=str(prefix),
               PYTHONPATH=os.pathsep.join([str(noisy.parent), str(PROJECT_ROOT)]))
    result, stdout = _never_import(tmp_path, env)
    assert result["after_auto"] is False and result["backend"] == "openssl"
    assert result["after_explicit"] is True and "liboqs-python faulty" in stdout


def test_auto_resolves_to_openssl(fake_liboqs: Path) -> None:
    # Even where liboqs is usable, auto keeps the always-present backend.
    assert backend.probe_liboqs().usable
    assert backend.resolve_backend("auto") == "openssl"
    assert get_kem(backend="auto").backend == "openssl"


def test_explicit_liboqs_without_library_names_the_fix(fresh_probe: None) -> None:
    with pytest.raises(PqcError) as info:
        get_kem("ML-KEM-768", backend="liboqs")
    message = str(info.value)
    assert "liboqs shared library is not installed" in message
    assert "OQS_INSTALL_PATH" in message and "pip install" in message and "openssl" in message
    with pytest.raises(PqcError, match="not available"):
        get_mldsa("ML-DSA-65", backend="liboqs")
    assert pqc.available_backends() == ("openssl",)
    assert "oqs" not in sys.modules


def test_unknown_backend() -> None:
    with pytest.raises(PqcError, match="use one of auto, openssl, liboqs"):
        backend.resolve_backend("botan")


def test_probe_library_without_python_package(fresh_probe: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _fake_install(tmp_path / "opt")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(prefix))
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name: None)
    probe = backend.probe_liboqs()
    assert not probe.usable
    assert probe.library == str(prefix / "lib" / "liboqs.so")
    assert "liboqs-python package is not installed" in probe.reason


def test_probe_finds_lib64_under_install_path(fresh_probe: None, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _fake_install(tmp_path / "opt", "lib64")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(prefix))
    monkeypatch.syspath_prepend(str(FAKE_OQS_DIR))
    probe = backend.probe_liboqs()
    assert probe.usable and probe.install_prefix == prefix


def test_probe_uses_loader_cache(fresh_probe: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ctypes.util, "find_library", lambda name: "liboqs.so.9")
    monkeypatch.syspath_prepend(str(FAKE_OQS_DIR))
    probe = backend.probe_liboqs()
    assert probe.usable and probe.library == "liboqs.so.9" and probe.install_prefix is None


def test_probe_refuses_library_outside_lib_dirs(fresh_probe: None, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # liboqs-python would not find this one and would start building its own.
    odd = tmp_path / "x86_64-linux-gnu"
    odd.mkdir()
    (odd / "liboqs.so.9").write_bytes(b"")
    monkeypatch.setattr(backend, "_library_dirs", lambda: [odd])
    monkeypatch.syspath_prepend(str(FAKE_OQS_DIR))
    probe = backend.probe_liboqs()
    assert not probe.usable
    assert "ldconfig" in probe.reason


def test_probe_rejects_old_liboqs_python(fake_liboqs: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "0.12.0")
    probe = backend.probe_liboqs()
    assert not probe.usable and "0.12.0 is too old" in probe.reason


def test_import_sets_install_path_for_oqs(fake_liboqs: Path) -> None:
    module = backend.import_oqs()
    loaded_with = module.LOADED_WITH_INSTALL_PATH
    assert loaded_with == str(fake_liboqs)
    assert os.environ["OQS_INSTALL_PATH"] == str(fake_liboqs)
    assert backend.import_oqs() is module


def test_import_failure_becomes_pqc_error(fresh_probe: None, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = _fake_install(tmp_path / "opt")
    monkeypatch.setenv("OQS_INSTALL_PATH", str(prefix))
    package = tmp_path / "broken" / "oqs"
    package.mkdir(parents=True)
    # What liboqs-python does when it cannot load (or build) the library.
    (package / "__init__.py").write_text(
        "raise SystemExit('Could not load liboqs shared library')\n")
    monkeypatch.syspath_prepend(str(tmp_path / "broken"))
    with pytest.raises(PqcError, match="importing liboqs-python failed"):
        backend.import_oqs()


# --- the liboqs glue, driven through the stand-in `oqs` -------------------------------


@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_liboqs_kem_glue(fake_liboqs: Path, name: str) -> None:
    liboqs, openssl = get_kem(name, "liboqs"), get_kem(name, "openssl")
    assert liboqs.backend == "liboqs"
    assert (liboqs.encapsulation_key_size, liboqs.ciphertext_size) == (
        openssl.encapsulation_key_size, openssl.ciphertext_size)
    dk = liboqs.generate()
    assert "backend=liboqs" in repr(dk)
    ciphertext, secret = liboqs.encapsulate(dk.encapsulation_key)
    assert len(ciphertext) == liboqs.ciphertext_size and len(secret) == 32
    assert dk.decapsulate(ciphertext) == secret
    # Cross-backend, both directions: catches a swapped (ciphertext, secret) order.
    ciphertext, secret = openssl.encapsulate(dk.encapsulation_key)
    assert dk.decapsulate(ciphertext) == secret
    dk_openssl = openssl.generate()
    ciphertext, secret = liboqs.encapsulate(dk_openssl.encapsulation_key)
    assert dk_openssl.decapsulate(ciphertext) == secret


def test_liboqs_kem_glue_kat_and_input_checks(fake_liboqs: Path) -> None:
    kem = get_kem("ML-KEM-768", "liboqs")
    vec = mlkem_vectors(768)[0]
    dk = kem.from_seed(vec["d"] + vec["z"])
    assert dk.encapsulation_key == vec["pk"]
    assert dk.decapsulate(vec["ct"]) == vec["ss"]
    # The stand-in, like liboqs-python, would zero-pad a short ciphertext: we must not
    # let it get that far.
    with pytest.raises(PqcError, match="ciphertext must be 1088 bytes"):
        dk.decapsulate(vec["ct"][:-1])
    with pytest.raises(PqcError, match="encapsulation key must be 1184 bytes"):
        kem.encapsulate(vec["pk"][:-1])
    bad = b"\xff\xff\xff" + vec["pk"][3:]
    with pytest.raises(PqcError, match="malformed"):
        kem.encapsulate(bad)
    with pytest.raises(PqcError, match="seed must be 64 bytes"):
        kem.from_seed(bytes(32))


def test_liboqs_native_objects_are_freed(fake_liboqs: Path) -> None:
    kem = get_kem("ML-KEM-768", "liboqs")
    oqs = backend.import_oqs()
    oqs.freed.clear()
    dk = kem.generate()
    kem.encapsulate(dk.encapsulation_key)
    assert oqs.freed == ["ML-KEM-768"]  # the encapsulation's temporary object
    del dk
    gc.collect()
    assert oqs.freed == ["ML-KEM-768", "ML-KEM-768"]


def test_liboqs_missing_mechanism(fake_liboqs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    oqs = backend.import_oqs()
    monkeypatch.delitem(oqs._KEMS, "ML-KEM-1024")
    with pytest.raises(PqcError, match="liboqs does not provide ML-KEM-1024"):
        get_kem("ML-KEM-1024", "liboqs")


@pytest.mark.parametrize("name", ["ML-DSA-44", "ML-DSA-65", "ML-DSA-87"])
def test_liboqs_mldsa_glue(fake_liboqs: Path, name: str) -> None:
    liboqs, openssl = get_mldsa(name, "liboqs"), get_mldsa(name, "openssl")
    key = liboqs.generate()
    for context in (b"", b"qkdgw"):
        signature = key.sign(b"msg", context)
        assert openssl.verify(key.public_key, signature, b"msg", context)
        assert liboqs.verify(key.public_key, signature, b"msg", context)
        assert not liboqs.verify(key.public_key, signature, b"msg", b"other")
    other = openssl.generate()
    assert liboqs.verify(other.public_key, other.sign(b"m", b"c"), b"m", b"c")
    with pytest.raises(PqcError, match="cannot derive ML-DSA keys from a seed"):
        liboqs.from_seed(bytes(32))


# --- real liboqs, where installed ----------------------------------------------------

_PROBE = backend.probe_liboqs()


@pytest.mark.liboqs
@pytest.mark.skipif(not _PROBE.usable, reason=f"liboqs backend unavailable: {_PROBE.reason}")
@pytest.mark.parametrize("name", ["ML-KEM-768", "ML-KEM-1024"])
def test_real_liboqs_interop(name: str) -> None:
    liboqs, openssl = get_kem(name, "liboqs"), get_kem(name, "openssl")
    for encapsulator, decapsulator in ((openssl, liboqs), (liboqs, openssl)):
        dk = decapsulator.generate()
        ciphertext, secret = encapsulator.encapsulate(dk.encapsulation_key)
        assert dk.decapsulate(ciphertext) == secret
    seed = os.urandom(64)
    assert liboqs.from_seed(seed).encapsulation_key == openssl.from_seed(seed).encapsulation_key
