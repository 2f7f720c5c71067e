"""Analysis on the tiny pair: preparation, the `topd run tiny` experiment, the oracle, agreement, plots."""
