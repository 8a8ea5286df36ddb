"""Convergence studies: ACCO against ZeRO-1 and DPU by held-out loss, and the estimate rule's analysis (the speed
harness is ``benchmarks/``)."""
