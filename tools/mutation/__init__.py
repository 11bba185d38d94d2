"""Mutation harness for seqkernels: see docs/MUTATION.md."""
