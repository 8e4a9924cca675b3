"""The stream stages, in the order an ad flows through them: download, classify, results."""
