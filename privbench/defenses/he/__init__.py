"""HE federated aggregation: schemes (CKKS, Paillier), the protocol simulation, the ledger, the defense.

Importing this package imports neither TenSEAL nor phe; they load when a scheme is used.
"""
