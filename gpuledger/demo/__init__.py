"""`gpuledger demo`: a simulated cluster driven through the real pipeline on one machine."""
