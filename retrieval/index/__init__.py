"""Retrieval, kernels and the inverted file: the kernel registry, aggregation (VLAD, ASMK, ASMK*
and their regional forms), the inverted file."""
