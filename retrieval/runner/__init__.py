"""Retrieval, the runner: the retrieval run stage by stage (serial or Ray), the ablation grid,
photo indexes and their HTML report."""
