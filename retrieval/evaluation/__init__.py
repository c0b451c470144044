"""Retrieval, evaluation: the Revisited and GLDv2 benchmarks and protocols, distractors
(revisitop1m), the FiftyOne view of results."""
