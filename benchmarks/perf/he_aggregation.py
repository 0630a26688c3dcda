"""Time and bytes of one HE aggregation round: K clients, LeNet- and capsnet-sized updates, plaintext vs CKKS vs Paillier.

    PYTHONPATH=. python benchmarks/perf/he_aggregation.py [--clients 4] [--sample 200] [--full]

Per update size and scheme: encryption time (summed over the K clients, who would run in parallel:
per client = that / K), aggregation time (the aggregator adds K ciphertexts), decryption time (one
hospital), bytes one client sends, and the ratios to plaintext (float32 values, summed with numpy).
Values are N(0, 0.05) float64 (the schemes' cost does not depend on them). Paillier on large updates is
slow (one 2048-bit modular exponentiation per ciphertext); without ``--full`` it is measured on
``--sample`` values (or ``--sample`` packed ciphertexts) and extrapolated linearly to the whole update,
labelled ``extrapolated``. Packed Paillier puts several fixed-point values in one plaintext
(``PackedLayout``): the same precision (2^-40) at a fraction of the ciphertexts.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from privbench.defenses.he import schemes
from privbench.models import build_model


def update_sizes(image_size: int = 32) -> dict[str, int]:
    out = {}
    for name in ("lenet", "capsnet"):
        model = build_model(name, {}, 1, image_size, 4, seed=0)
        out[f"{name} {image_size}x{image_size}"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return out


def measure(keys, values: list[np.ndarray], clients: int) -> dict[str, float]:
    """One round on ``values`` (one array per client): seconds and bytes, and the max abs error."""
    t0 = time.perf_counter()
    blobs = [keys.encrypt(v, clients).to_bytes() for v in values]
    enc = time.perf_counter() - t0
    public = keys.public()
    t0 = time.perf_counter()
    aggregate = public.add([schemes.Ciphertext.from_bytes(b) for b in blobs])
    agg = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = keys.decrypt(aggregate)
    dec = time.perf_counter() - t0
    return {"encrypt_s": enc, "aggregate_s": agg, "decrypt_s": dec, "bytes": float(np.mean([len(b) for b in blobs])),
            "error": float(np.abs(out - sum(values)).max())}


def plaintext(values: list[np.ndarray]) -> dict[str, float]:
    t0 = time.perf_counter()
    blobs = [v.astype("<f4").tobytes() for v in values]
    enc = time.perf_counter() - t0
    t0 = time.perf_counter()
    total = sum(np.frombuffer(b, "<f4").astype(np.float64) for b in blobs)
    agg = time.perf_counter() - t0
    return {"encrypt_s": enc, "aggregate_s": agg, "decrypt_s": 0.0, "bytes": float(len(blobs[0])),
            "error": float(np.abs(total - sum(values)).max())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--sample", type=int, default=200, help="values (unpacked) or ciphertexts (packed) measured")
    parser.add_argument("--full", action="store_true", help="measure Paillier on the whole update (slow)")
    parser.add_argument("--key-bits", type=int, default=2048)
    args = parser.parse_args()
    k = args.clients
    rng = np.random.default_rng(0)
    ckks = schemes.CKKSKeys(schemes.CKKSSettings())
    paillier = schemes.PaillierKeys(schemes.PaillierSettings(key_bits=args.key_bits, precision=2.0**-40))
    packed = schemes.PaillierKeys(schemes.PaillierSettings(key_bits=args.key_bits, precision=2.0**-40, pack=True))
    per_plaintext = packed.layout(k).per_plaintext
    try:
        import gmpy2  # noqa: F401

        gmp = "with gmpy2"
    except ImportError:
        gmp = "without gmpy2 (pure-Python big integers: slower)"
    print(f"K = {k} clients; CKKS N=8192, moduli [60,40,40,60], scale 2^40; Paillier {args.key_bits}-bit "
          f"({gmp}), precision 2^-40, packed: {per_plaintext} values of {packed.layout(k).slot_bits} bits per "
          f"plaintext\n")
    header = (f"{'update':<16} {'params':>8} {'scheme':<16} {'enc s (all K)':>13} {'agg s':>9} {'dec s':>9} "
              f"{'round s':>10} {'x plain':>10} {'bytes/client':>13} {'x plain':>8} {'max err':>9}  how")
    print(header)
    print("-" * len(header))
    notes = []
    for label, n in update_sizes().items():
        values = [rng.normal(0, 0.05, n) for _ in range(k)]
        rows = {"plaintext": (plaintext(values), "measured"), "ckks": (measure(ckks, values, k), "measured")}
        for name, keys, unit in (("paillier", paillier, 1), ("paillier packed", packed, per_plaintext)):
            sample = n if args.full else min(n, args.sample * unit)
            r = measure(keys, [v[:sample] for v in values], k)
            how = "measured"
            if sample < n:
                ratio = np.ceil(n / unit) / np.ceil(sample / unit)  # ciphertexts in the update / in the sample
                r = {**r, "encrypt_s": r["encrypt_s"] * ratio, "aggregate_s": r["aggregate_s"] * ratio,
                     "decrypt_s": r["decrypt_s"] * ratio, "bytes": r["bytes"] * ratio}
                how = f"extrapolated x{ratio:.1f} from {sample} values"
            rows[name] = (r, how)
        base = rows["plaintext"][0]
        base_round = base["encrypt_s"] + base["aggregate_s"] + base["decrypt_s"]
        for name, (r, how) in rows.items():
            total = r["encrypt_s"] + r["aggregate_s"] + r["decrypt_s"]
            print(f"{label:<16} {n:>8} {name:<16} {r['encrypt_s']:>13.4g} {r['aggregate_s']:>9.3g} "
                  f"{r['decrypt_s']:>9.3g} {total:>10.4g} {total / base_round:>10.3g} {r['bytes']:>13.4g} "
                  f"{r['bytes'] / base['bytes']:>8.1f} {r['error']:>9.2g}  {how}")
            if name != "plaintext":
                notes.append(f"{label}, {name}: {total:.3g} s per round ({total / base_round:.3g} x plaintext), "
                             f"{r['bytes'] / base['bytes']:.1f} x the plaintext bytes per client ({how})")
    print("\nClosing note:")
    for note in notes:
        print(f"  {note}")


if __name__ == "__main__":
    main()
