"""icpo's compiled ops: typed wrappers with validation, fake kernels and autograd."""
