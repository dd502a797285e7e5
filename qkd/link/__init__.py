"""The BB84 link between two KMEs: classical-channel authentication, the emulated
quantum channel split into sender, eavesdropper and receiver. Sans-I/O cores only."""
