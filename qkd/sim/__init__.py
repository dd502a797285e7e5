"""Decoy-state BB84 link simulator and two-party post-processing.

Layout:
    params        link, source, detector and attack parameters (validated)
    channel       the emulated quantum channel: source, fibre, detectors, eavesdroppers
    theory        asymptotic key-rate formulas (GLLP, Lo-Ma-Chen, Ma et al., Shor-Preskill, PLOB)
    estimation    finite-size decoy estimation (Lim, Curty, Walenta, Xu, Zbinden 2014)
    cascade       Cascade reconciliation, vectorised across frames, as two sans-I/O parties
    verification  universal-hash error verification
    privacy       Toeplitz privacy amplification (compiled GF(2) kernel, FFT reference)
    messages      the classical-channel messages and their byte encoding
    protocol      Alice and Bob post-processing state machines
    session       runs one simulated link session (channel + both parties in memory)
    cli           `qkdgw qkd simulate|sweep|reconcile`
"""
