"""Applications built on the library: `demo` (train and sample a small model in minutes) and
`reproduce` (the thesis's claims at small scale, as a report)."""
