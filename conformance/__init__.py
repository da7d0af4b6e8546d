"""mmerge's conformance suite: every registered method, on every available backend, against
spec/methods.md (properties, cross-backend agreement, and the test vectors in spec/vectors/)."""
