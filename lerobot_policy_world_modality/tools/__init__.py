"""Console tools: MetaWorld expert recorder, the quickstart demo and its report."""
