"""Evaluation: held-out bits per byte (`bpb`) and HumanEval pass@k (`humaneval`, run through `sandbox`)."""
