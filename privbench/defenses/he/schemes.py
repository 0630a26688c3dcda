"""Additive homomorphic encryption of flat float64 vectors: CKKS (TenSEAL), Paillier (phe), and plaintext.

Each scheme has two sides. The key holders (the hospitals: in the paper's
setting every hospital holds the secret key) build a ``*Keys`` object, which
encrypts and decrypts. The aggregator gets ``keys.public()``: a ``*Public``
object built from the public material only (TenSEAL context serialized without
its secret key; the Paillier public key ``n``), which can add ciphertexts and
nothing else.

A ciphertext travels as bytes (``Ciphertext.to_bytes``): a JSON header line
(scheme, number of values, number of summands, scheme metadata, part lengths)
followed by the parts. Ciphertexts carry no integrity check of their own; the
protocol checks them against digests on the ledger.

Range checks. CKKS does not raise when a value outgrows the scale and modulus:
it wraps silently. ``CKKSKeys.encrypt`` therefore refuses values with
``|v| * summands * 2**scale_bits >= 2**(q0_bits - 1)`` (q0 = the first
coefficient modulus): the aggregate of ``summands`` such values then stays
decryptable even after rescaling to the lowest level. With the defaults
(q0 = 60 bits, scale 2^40) that is |v| < 2^19 / summands. Packed Paillier
refuses values outside ``[-pack_bound, pack_bound]``.
"""

from __future__ import annotations

import hashlib
import json
import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np

from privbench.config import ConfigError
from privbench.deps import MissingLibrary


class HERangeError(ConfigError):
    """The values to encrypt do not fit the scheme's parameters (they would wrap or overflow)."""


class NoSecretKeyError(RuntimeError):
    """Decryption was attempted by a party that holds no secret key."""


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingLibrary(module, "the he defense") from exc


@dataclass(frozen=True)
class Ciphertext:
    """An encrypted vector of ``length`` float64 values, the sum of ``summands`` client ciphertexts."""

    scheme: str
    length: int
    parts: tuple[bytes, ...]
    summands: int = 1
    meta: tuple[tuple[str, Any], ...] = ()

    def to_bytes(self) -> bytes:
        header = {"scheme": self.scheme, "length": self.length, "summands": self.summands,
                  "meta": dict(self.meta), "parts": [len(p) for p in self.parts]}
        return json.dumps(header, sort_keys=True).encode() + b"\n" + b"".join(self.parts)

    @classmethod
    def from_bytes(cls, blob: bytes) -> "Ciphertext":
        head, sep, body = blob.partition(b"\n")
        if not sep:
            raise ValueError("ciphertext has no header line")
        header = json.loads(head)
        parts, at = [], 0
        for n in header["parts"]:
            parts.append(body[at : at + n])
            at += n
        if at != len(body):
            raise ValueError(f"ciphertext body is {len(body)} bytes, its header declares {at}")
        return cls(header["scheme"], int(header["length"]), tuple(parts), int(header["summands"]),
                   tuple(sorted(header["meta"].items())))


def digest(blob: bytes) -> str:
    """SHA-256 hex digest of bytes on the wire."""
    return hashlib.sha256(blob).hexdigest()


class PublicScheme(ABC):
    """The aggregator's side: adds ciphertexts; holds no secret key."""

    name: str

    @abstractmethod
    def add(self, ciphertexts: list[Ciphertext]) -> Ciphertext:
        """The homomorphic sum of ciphertexts of equal length."""

    @abstractmethod
    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        """Attempt decryption with what this side holds (raises: it holds no secret key)."""


class KeyHolderScheme(ABC):
    """The key holders' side: encrypts (after a range check) and decrypts."""

    name: str

    @abstractmethod
    def encrypt(self, values: np.ndarray, summands: int) -> Ciphertext:
        """Encrypt float64 [n]; ``summands``: how many such vectors will be added (for the range check)."""

    @abstractmethod
    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        """float64 [n]."""

    @abstractmethod
    def public(self) -> PublicScheme:
        """The aggregator's side, built from public material only."""

    def describe(self) -> dict[str, Any]:
        return {"scheme": self.name}


# -- plaintext (FedAvg in the clear: the utility twin) -------------------------------------------


class PlainPublic(PublicScheme):
    name = "plaintext"

    def add(self, ciphertexts: list[Ciphertext]) -> Ciphertext:
        total = sum(np.frombuffer(c.parts[0], dtype="<f8") for c in ciphertexts)
        return Ciphertext("plaintext", ciphertexts[0].length, (np.asarray(total, "<f8").tobytes(),),
                          sum(c.summands for c in ciphertexts))

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:  # there is nothing to decrypt: it is plaintext
        return np.frombuffer(ciphertext.parts[0], dtype="<f8").copy()


class PlainKeys(KeyHolderScheme):
    """No encryption: values travel as little-endian float64."""

    name = "plaintext"

    def encrypt(self, values: np.ndarray, summands: int) -> Ciphertext:
        return Ciphertext("plaintext", len(values), (np.asarray(values, "<f8").tobytes(),))

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        return PlainPublic().decrypt(ciphertext)

    def public(self) -> PublicScheme:
        return PlainPublic()


# -- CKKS (TenSEAL) ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class CKKSSettings:
    """CKKS parameters: ring degree N (N/2 slots per ciphertext), coefficient moduli in bits, scale 2**scale_bits."""

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    scale_bits: int = 40

    @property
    def capacity(self) -> float:
        """Largest |aggregate| that stays decryptable at the lowest level: 2**(q0 - 1) / scale."""
        return 2.0 ** (self.coeff_mod_bit_sizes[0] - 1 - self.scale_bits)


class CKKSPublic(PublicScheme):
    name = "ckks"

    def __init__(self, serialized_context: bytes):
        ts = _require("tenseal")
        self.context = ts.context_from(serialized_context)

    def _vectors(self, ciphertext: Ciphertext):
        import tenseal as ts

        return [ts.ckks_vector_from(self.context, part) for part in ciphertext.parts]

    def add(self, ciphertexts: list[Ciphertext]) -> Ciphertext:
        total = self._vectors(ciphertexts[0])
        for c in ciphertexts[1:]:
            if c.length != ciphertexts[0].length:
                raise ValueError("ciphertexts of different lengths cannot be added")
            total = [a + b for a, b in zip(total, self._vectors(c), strict=True)]
        return Ciphertext("ckks", ciphertexts[0].length, tuple(v.serialize() for v in total),
                          sum(c.summands for c in ciphertexts), ciphertexts[0].meta)

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        # TenSEAL itself refuses: the context holds no secret key.
        return np.concatenate([np.asarray(v.decrypt()) for v in self._vectors(ciphertext)])


class CKKSKeys(KeyHolderScheme):
    """A TenSEAL CKKS context with its secret key; vectors are encrypted in chunks of N/2 slots."""

    name = "ckks"

    def __init__(self, settings: CKKSSettings):
        ts = _require("tenseal")
        self.settings = settings
        try:
            self.context = ts.context(ts.SCHEME_TYPE.CKKS, poly_modulus_degree=settings.poly_modulus_degree,
                                      coeff_mod_bit_sizes=list(settings.coeff_mod_bit_sizes))
        except ValueError as exc:  # SEAL's parameter validation
            raise ConfigError(
                f"he: CKKS parameters rejected by SEAL (poly_modulus_degree={settings.poly_modulus_degree}, "
                f"coeff_mod_bit_sizes={list(settings.coeff_mod_bit_sizes)}): {exc}. The total of the moduli must "
                f"stay within the ring degree's security limit (218 bits for 8192, 438 for 16384)."
            ) from exc
        self.context.global_scale = 2.0**settings.scale_bits
        self.slots = settings.poly_modulus_degree // 2

    def public(self) -> CKKSPublic:
        return CKKSPublic(self.context.serialize(save_secret_key=False))

    def check_range(self, values: np.ndarray, summands: int) -> None:
        s = self.settings
        peak = float(np.max(np.abs(values))) if len(values) else 0.0
        if not math.isfinite(peak) or peak * summands >= s.capacity:
            raise HERangeError(
                f"he: CKKS would wrap silently: values reach |v| = {peak:.4g}, and {summands} of them summed need "
                f"{summands} x {peak:.4g} < 2^(q0-1)/scale = 2^({s.coeff_mod_bit_sizes[0]}-1-{s.scale_bits}) "
                f"= {s.capacity:.4g}. Raise the first coefficient modulus (coeff_mod_bit_sizes[0]) or lower "
                f"scale_bits (less precision), or lower the learning rate."
            )

    def encrypt(self, values: np.ndarray, summands: int) -> Ciphertext:
        import tenseal as ts

        values = np.asarray(values, dtype=np.float64)
        self.check_range(values, summands)
        parts = tuple(
            ts.ckks_vector(self.context, values[i : i + self.slots]).serialize()
            for i in range(0, len(values), self.slots)
        )
        return Ciphertext("ckks", len(values), parts)

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        import tenseal as ts

        out = np.concatenate([np.asarray(ts.ckks_vector_from(self.context, p).decrypt()) for p in ciphertext.parts])
        return out[: ciphertext.length]

    def describe(self) -> dict[str, Any]:
        s = self.settings
        return {"scheme": "ckks", "library": "tenseal", "poly_modulus_degree": s.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(s.coeff_mod_bit_sizes), "scale": f"2^{s.scale_bits}",
                "slots_per_ciphertext": self.slots, "max_abs_aggregate": s.capacity}


# -- Paillier (phe) ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PaillierSettings:
    """Paillier: modulus n of ``key_bits`` bits; floats in phe's fixed-point encoding at ``precision``.

    ``pack``: several fixed-point values per plaintext (slots of ``slot_bits`` bits, see ``PackedLayout``);
    values must then lie in [-pack_bound, pack_bound].
    """

    key_bits: int = 2048
    precision: float = 1e-12
    pack: bool = False
    pack_bound: float = 64.0


@dataclass(frozen=True)
class PackedLayout:
    """Fixed-point slots in one Paillier plaintext.

    A value v becomes m = round(v * 2**frac_bits) + offset, offset = bound * 2**frac_bits, so
    0 <= m < 2**value_bits; a sum of ``summands`` slots stays below 2**slot_bits, so slots never carry
    into each other. ``per_plaintext`` slots fill at most ``usable_bits`` < log2(n/3) bits.
    """

    frac_bits: int
    value_bits: int
    slot_bits: int
    per_plaintext: int
    offset: int

    @classmethod
    def make(cls, settings: PaillierSettings, usable_bits: int, summands: int) -> "PackedLayout":
        frac = math.ceil(-math.log2(settings.precision))
        offset = math.ceil(settings.pack_bound * 2**frac)
        value_bits = (2 * offset).bit_length()
        slot_bits = value_bits + max(1, math.ceil(math.log2(summands)) if summands > 1 else 1)
        per = usable_bits // slot_bits
        if per < 1:
            raise ConfigError(f"he: a Paillier key of {settings.key_bits} bits cannot hold one {slot_bits}-bit slot")
        return cls(frac, value_bits, slot_bits, per, offset)


class PaillierPublic(PublicScheme):
    name = "paillier"

    def __init__(self, n: int):
        phe = _require("phe")
        self.public_key = phe.paillier.PaillierPublicKey(n)  # the public key only: no p, q

    def _numbers(self, ciphertext: Ciphertext):
        from phe.paillier import EncryptedNumber

        exponent = dict(ciphertext.meta).get("exponent", 0)
        return [EncryptedNumber(self.public_key, int.from_bytes(p, "big"), exponent) for p in ciphertext.parts]

    def add(self, ciphertexts: list[Ciphertext]) -> Ciphertext:
        total = self._numbers(ciphertexts[0])
        for c in ciphertexts[1:]:
            if c.length != ciphertexts[0].length or c.meta != ciphertexts[0].meta:
                raise ValueError("ciphertexts of different lengths or encodings cannot be added")
            total = [a + b for a, b in zip(total, self._numbers(c), strict=True)]  # c1 * c2 mod n^2
        width = (self.public_key.nsquare.bit_length() + 7) // 8
        return Ciphertext("paillier", ciphertexts[0].length,
                          tuple(x.ciphertext(be_secure=False).to_bytes(width, "big") for x in total),
                          sum(c.summands for c in ciphertexts), ciphertexts[0].meta)

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        raise NoSecretKeyError("this party holds only the Paillier public key n; decryption needs the private key (p, q)")


class PaillierKeys(KeyHolderScheme):
    """A phe key pair. Unpacked: one ciphertext per value (phe's EncodedNumber at a fixed exponent).
    Packed: ``PackedLayout.per_plaintext`` values per ciphertext (raw Paillier on the packed integer)."""

    name = "paillier"

    def __init__(self, settings: PaillierSettings):
        phe = _require("phe")
        self.settings = settings
        self.public_key, self.private_key = phe.paillier.generate_paillier_keypair(n_length=settings.key_bits)
        self.width = (self.public_key.nsquare.bit_length() + 7) // 8
        # phe decodes plaintexts above n/3 as negative: packed sums must stay below max_int
        self.usable_bits = self.public_key.max_int.bit_length() - 1
        self.exponent = math.floor(math.log(settings.precision, 16))  # phe's EncodedNumber.BASE = 16

    def public(self) -> PaillierPublic:
        return PaillierPublic(self.public_key.n)

    def layout(self, summands: int) -> PackedLayout:
        return PackedLayout.make(self.settings, self.usable_bits, summands)

    def encrypt(self, values: np.ndarray, summands: int) -> Ciphertext:
        values = np.asarray(values, dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise HERangeError("he: cannot encrypt non-finite values (nan or inf) with Paillier")
        pk = self.public_key
        if not self.settings.pack:
            parts = tuple(pk.encrypt(float(v), precision=self.settings.precision).ciphertext(be_secure=True)
                          .to_bytes(self.width, "big") for v in values)
            return Ciphertext("paillier", len(values), parts, meta=(("exponent", self.exponent),))
        layout = self.layout(summands)
        bound = self.settings.pack_bound
        peak = float(np.max(np.abs(values))) if len(values) else 0.0
        if peak > bound:
            raise HERangeError(f"he: packed Paillier slots hold values in [-{bound:g}, {bound:g}]; got |v| = {peak:.4g}. "
                               f"Raise pack_bound (fewer values per ciphertext).")
        fixed = [round(float(v) * 2**layout.frac_bits) + layout.offset for v in values]
        parts = []
        for i in range(0, len(fixed), layout.per_plaintext):
            packed = 0
            for j, m in enumerate(fixed[i : i + layout.per_plaintext]):
                packed |= m << (j * layout.slot_bits)
            parts.append(pk.raw_encrypt(packed).to_bytes(self.width, "big"))
        meta = (("frac_bits", layout.frac_bits), ("slot_bits", layout.slot_bits),
                ("per_plaintext", layout.per_plaintext), ("offset", layout.offset))
        return Ciphertext("paillier", len(values), tuple(parts), meta=meta)

    def decrypt(self, ciphertext: Ciphertext) -> np.ndarray:
        from phe.paillier import EncryptedNumber

        meta = dict(ciphertext.meta)
        if "slot_bits" not in meta:
            return np.array([self.private_key.decrypt(EncryptedNumber(self.public_key, int.from_bytes(p, "big"),
                                                                      meta["exponent"]))
                             for p in ciphertext.parts], dtype=np.float64)
        slot, per, frac = meta["slot_bits"], meta["per_plaintext"], meta["frac_bits"]
        mask = (1 << slot) - 1
        shift = ciphertext.summands * meta["offset"]
        out = []
        for p in ciphertext.parts:
            packed = self.private_key.raw_decrypt(int.from_bytes(p, "big"))
            out.extend(((packed >> (j * slot)) & mask) - shift for j in range(per))
        return np.array(out[: ciphertext.length], dtype=np.float64) / 2.0**frac

    def resolution(self, summands: int) -> float:
        """Worst-case absolute error of a decrypted sum of ``summands`` values: rounding of each encoding."""
        if self.settings.pack:
            return summands * 0.5 * 2.0 ** -self.layout(summands).frac_bits
        return summands * 0.5 * 16.0**self.exponent

    def describe(self) -> dict[str, Any]:
        s = self.settings
        out = {"scheme": "paillier", "library": "phe", "key_bits": s.key_bits, "precision": s.precision,
               "exponent_base16": self.exponent, "packed": s.pack}
        if s.pack:
            out["pack_bound"] = s.pack_bound
        return out
